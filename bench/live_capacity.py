"""Live capacity: how many 720p30 streams one node moderates on time.

N looping 1280x720 30 fps publishers (ffmpeg -> nginx-rtmp on loopback) and
N tasks at fps 1 with moderation, 5 s segments. A trial passes when every
task keeps producing records and the p95 latency from a segment's cut to its
record being stored is under 1 s. N grows until a trial fails; the daemon is
pinned to one core, then to two (ONNX Runtime gets as many threads).

Model: the test bundle (default), `--model DIR`, or `--shape-real [fp32|int8]`
(the real ViT-B/32 architecture with random weights, bench/shape_real.py).

Mix: `--static-share F` makes that share of the streams static sources (a
screen-shared slide deck: a new slide every 10 s, no sensor noise), where
duplicate-frame reuse applies; the rest are the moving test pattern.

Prints, per trial: N, p50/p95 latency, daemon CPU per stream (% of a core),
RSS per stream, the reuse rate (frames reused / frames sampled), the share
of the window the image encoder was busy (near 1: inference binds; lower
while the trial fails: decoding and the rest bind), and the largest N that
passed for each core count.

    python bench/live_capacity.py [--start 8] [--step 8] [--max 64] [--window 30]
        [--model DIR | --shape-real [fp32|int8]] [--static-share 0.5] [--cores 1,2]
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

import numpy as np  # noqa: E402


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


def metric(metrics: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def static_video(out: Path) -> Path:
    """A 20 s 720p30 'slide deck' (two slides, 10 s each), H.264 with a 2 s GOP."""
    path = out / "bench_720p30_slides.mp4"
    if path.exists():
        return path
    import av
    from fractions import Fraction

    print("generating the 20 s 720p30 slides input (once) ...", file=sys.stderr)
    rng = np.random.default_rng(4)
    slides = []
    for _ in range(2):
        img = np.full((720, 1280, 3), 240, np.uint8)
        for _ in range(60):
            x, y = rng.integers(0, 1180), rng.integers(0, 690)
            img[y:y + rng.integers(4, 30), x:x + rng.integers(20, 100)] = rng.integers(0, 255, 3)
        slides.append(img)
    tmp = path.with_suffix(".tmp.mp4")
    c = av.open(str(tmp), "w")
    v = c.add_stream("libx264", rate=30)
    v.width, v.height, v.pix_fmt = 1280, 720, "yuv420p"
    v.options = {"g": "60", "keyint_min": "60", "sc_threshold": "0", "preset": "veryfast"}
    a = c.add_stream("aac", rate=48000)  # a presenter's audio, as the moving input has
    a.layout = "mono"
    for i in range(600):
        f = av.VideoFrame.from_ndarray(slides[i // 300], format="rgb24")
        f.pts, f.time_base = i, Fraction(1, 30)
        for p in v.encode(f):
            c.mux(p)
        tone = 0.1 * np.sin(2 * np.pi * 440 * (i * 1600 + np.arange(1600)) / 48000)
        af = av.AudioFrame.from_ndarray(tone.astype(np.float32).reshape(1, -1), format="fltp", layout="mono")
        af.sample_rate, af.pts = 48000, i * 1600
        for p in a.encode(af):
            c.mux(p)
    for stream in (v, a):
        for p in stream.encode(None):
            c.mux(p)
    c.close()
    tmp.rename(path)
    return path


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
    text0 = d.call("GET", "/metrics").body.decode()
    m0, c0, t0 = latency_buckets(text0), cpu_seconds(pid), time.monotonic()
    g0 = load_generator_cpu()
    counts0 = {t: d.call("GET", f"/v1/streams/{t}", key=key).data["counters"]["segments"] for t in tasks}
    time.sleep(window)
    text1 = d.call("GET", "/metrics").body.decode()
    m1, c1, t1 = latency_buckets(text1), cpu_seconds(pid), time.monotonic()
    delta = {name: metric(text1, name) - metric(text0, name) for name in (
        "streamguard_frames_sampled_total", "streamguard_frames_reused_total", "streamguard_inference_seconds_sum",
        "streamguard_inference_batch_size_sum", "streamguard_inference_batch_size_count")}
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
            "rss_mb": rss, "min_segments": min(produced), "expected": expected, "all_running": all_running,
            "reuse_rate": delta["streamguard_frames_reused_total"] / max(1.0, delta["streamguard_frames_sampled_total"]),
            "encoder_busy": delta["streamguard_inference_seconds_sum"] / (t1 - t0),
            "mean_batch": delta["streamguard_inference_batch_size_sum"]
            / max(1.0, delta["streamguard_inference_batch_size_count"]),
            "lag": metric(text1, "streamguard_inference_queue_depth")}


def run(cores: int, args: argparse.Namespace, videos: list[Path], bundle: Path) -> int:
    best = 0
    env = {"STREAMGUARD_LIMITS__MAX_TASKS": "256", "STREAMGUARD_MODEL__CPU_THREADS": str(cores),
           "STREAMGUARD_INFERENCE__REUSE_DUPLICATES": "false" if args.no_reuse else "true"}
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
                    p = Publisher(videos[len(pubs)], rtmp.url(f"s{len(pubs)}"))
                    p.start()
                    pubs.append(p)
                r = trial(d, key, rtmp, n, args.window)
                print(f"{cores} core(s)  N={n:3d}  {'ok  ' if r['ok'] else 'FAIL'}  p50 {r['p50']:.2f} s  "
                      f"p95 {r['p95']:.2f} s  cpu/stream {r['cpu_pct_per_stream']:.1f}% of a core  "
                      f"rss/stream {(r['rss_mb'] - base_rss) / n:.1f} MB  "
                      f"segments {r['min_segments']}/{r['expected']:.0f}  reconnects {r['reconnects']}  "
                      f"daemon {r['daemon_cores']:.2f} cores, publishers+nginx {r['generator_cores']:.2f} cores  "
                      f"reuse {100 * r['reuse_rate']:.0f}%  encoder busy {100 * r['encoder_busy']:.0f}%  "
                      f"mean batch {r['mean_batch']:.1f}  queued {r['lag']:.0f}",
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
    ap.add_argument("--model", type=Path, help="model bundle directory (default: the test bundle)")
    ap.add_argument("--shape-real", nargs="?", const="fp32", choices=("fp32", "int8"),
                    help="the shape-real ViT-B/32 bundle (built and cached in bench/out/)")
    ap.add_argument("--static-share", type=float, default=0.0,
                    help="share of streams that are static slide decks (where duplicate-frame reuse applies)")
    ap.add_argument("--no-reuse", action="store_true", help="inference.reuse_duplicates = false")
    args = ap.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    sys.path.insert(0, str(HERE))
    from scan_throughput import input_video, resolve_bundle
    moving = input_video(out, "all-reference")
    slides = static_video(out) if args.static_share > 0 else moving
    # Static streams spread evenly through the stream numbers, so every N has the share.
    videos = [slides if int((i + 1) * args.static_share) > int(i * args.static_share) else moving
              for i in range(args.max)]
    bundle = resolve_bundle(args.model, args.shape_real, out)
    print(f"model {bundle}; static share {args.static_share:.0%}; reuse {'off' if args.no_reuse else 'on'}",
          flush=True)
    results = {int(c): run(int(c), args, videos, bundle) for c in args.cores.split(",")}
    for cores, n in results.items():
        print(f"largest N on time with {cores} core(s): {n}")


if __name__ == "__main__":
    main()
