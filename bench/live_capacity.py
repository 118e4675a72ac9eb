"""Live capacity: how many 720p30 streams one node moderates on time.

N looping 1280x720 30 fps publishers (ffmpeg -> nginx-rtmp on loopback) and
N tasks at fps 1 with moderation (test model), 5 s segments. A trial passes
when every task keeps producing records and the p95 latency from a segment's
cut to its record being stored is under 1 s. N grows until a trial fails; the
daemon is pinned to one core, then to two.

Prints, per trial: N, p50/p95 latency, daemon CPU per stream (% of a core),
RSS per stream, and the largest N that passed for each core count.

    python bench/live_capacity.py [--start 8] [--step 8] [--max 64] [--window 30]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import Daemon  # noqa: E402
from live_servers import Publisher, RtmpServer  # noqa: E402

from streamguard.inference.testmodel import make_test_bundle  # noqa: E402

SEGMENT = 5
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def load_generator_cpu() -> float:
    """CPU seconds of every ffmpeg publisher and nginx process: the load
    generator shares this machine's cores with the daemon."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if cmd.endswith((b"ffmpeg", b"nginx")) or b"nginx:" in cmd:
                total += cpu_seconds(int(entry.name))
        except OSError:
            continue
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def latency_buckets(metrics: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'streamguard_segment_latency_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', metrics):
        out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """histogram_quantile over the delta of two cumulative snapshots."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return les[-2]


def trial(d: Daemon, key: str, rtmp: RtmpServer, n: int, window: float) -> dict:
    tasks = []
    for i in range(n):
        r = d.call("POST", "/v1/streams", {"url": rtmp.url(f"s{i}"), "enable_content_moderation": True,
                                           "fps": 1, "segment_seconds": SEGMENT}, key=key)
        assert r.status == 200, r.body
        tasks.append(r.body["data"]["task_id"])
    time.sleep(2 * SEGMENT + 2)  # connect and settle
    pid = d.proc.pid
    m0, c0, t0 = latency_buckets(d.call("GET", "/metrics").body.decode()), cpu_seconds(pid), time.monotonic()
    g0 = load_generator_cpu()
    counts0 = {t: d.call("GET", f"/v1/streams/{t}", key=key).data["counters"]["segments"] for t in tasks}
    time.sleep(window)
    m1, c1, t1 = latency_buckets(d.call("GET", "/metrics").body.decode()), cpu_seconds(pid), time.monotonic()
    g1 = load_generator_cpu()
    views = {t: d.call("GET", f"/v1/streams/{t}", key=key).data for t in tasks}
    rss = rss_mb(pid)
    for t in tasks:
        d.call("POST", f"/v1/streams/{t}/stop", key=key)
    produced = [views[t]["counters"]["segments"] - counts0[t] for t in tasks]
    expected = window / SEGMENT
    all_running = all(v["state"] == "running" for v in views.values())
    p50, p95 = quantile(0.5, m0, m1), quantile(0.95, m0, m1)
    ok = all_running and min(produced) >= expected - 1.5 and p95 < 1.0
    reconnects = sum(v["counters"]["reconnects"] for v in views.values())
    return {"n": n, "ok": ok, "reconnects": reconnects, "daemon_cores": (c1 - c0) / (t1 - t0),
            "generator_cores": (g1 - g0) / (t1 - t0), "p50": p50, "p95": p95, "cpu_pct_per_stream": 100 * (c1 - c0) / (t1 - t0) / n,
            "rss_mb": rss, "min_segments": min(produced), "expected": expected, "all_running": all_running}


def run(cores: int, args: argparse.Namespace, video: Path, bundle: Path) -> int:
    best = 0
    env = {"STREAMGUARD_LIMITS__MAX_TASKS": "256"}
    with RtmpServer() as rtmp:
        pubs: list[Publisher] = []
        d = Daemon(HERE / "out" / f"live-{cores}core", bundle, env=env)
        d.start()
        os.sched_setaffinity(d.proc.pid, set(sorted(os.sched_getaffinity(0))[:cores]))
        for tid in os.listdir(f"/proc/{d.proc.pid}/task"):  # threads started before pinning
            os.sched_setaffinity(int(tid), set(sorted(os.sched_getaffinity(0))[:cores]))
        key = d.create_key("bench")
        base_rss = rss_mb(d.proc.pid)
        try:
            n = args.start
            while n <= args.max:
                while len(pubs) < n:
                    p = Publisher(video, rtmp.url(f"s{len(pubs)}"))
                    p.start()
                    pubs.append(p)
                r = trial(d, key, rtmp, n, args.window)
                print(f"{cores} core(s)  N={n:3d}  {'ok  ' if r['ok'] else 'FAIL'}  p50 {r['p50']:.2f} s  "
                      f"p95 {r['p95']:.2f} s  cpu/stream {r['cpu_pct_per_stream']:.1f}% of a core  "
                      f"rss/stream {(r['rss_mb'] - base_rss) / n:.1f} MB  "
                      f"segments {r['min_segments']}/{r['expected']:.0f}  reconnects {r['reconnects']}  "
                      f"daemon {r['daemon_cores']:.2f} cores, publishers+nginx {r['generator_cores']:.2f} cores",
                      flush=True)
                if not r["ok"]:
                    break
                best = n
                n += args.step
                time.sleep(3)
        finally:
            for p in pubs:
                p.stop()
            d.kill()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--step", type=int, default=8)
    ap.add_argument("--max", type=int, default=64)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--cores", default="1,2")
    args = ap.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    video = out / "bench_720p30_gop2s.mp4"
    if not video.exists():
        sys.path.insert(0, str(HERE))
        from scan_throughput import input_video
        input_video(out)
    bundle = out / "test-bundle"
    if not (bundle / "manifest.json").exists():
        make_test_bundle(bundle)
    results = {int(c): run(int(c), args, video, bundle) for c in args.cores.split(",")}
    for cores, n in results.items():
        print(f"largest N on time with {cores} core(s): {n}")


if __name__ == "__main__":
    main()
