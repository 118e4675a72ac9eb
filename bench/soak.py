"""Soak: N live streams for a long time; does anything grow that should not?

N publishers loop a short 640x360 file into nginx-rtmp on loopback
(`ffmpeg -re -stream_loop -1 -i f.mp4 -c copy -f flv rtmp://...`, the
Publisher and RtmpServer of tests/live_servers.py), N tasks with moderation
(test model) and 2 s segments on a real `streamguard serve` (tests/daemon.py)
with media retention set to 15 minutes. Every interval it prints the daemon's
RSS, open files and threads, bytes on disk (media, store), records, -1 records
and reconnects; at the end, the growth of RSS and disk from the baseline
sample (20 minutes in) to the end. Targets: < 5 % growth, zero -1 records.

    python bench/soak.py                          # 16 streams, 60 min (the full soak)
    python bench/soak.py --streams 4 --minutes 3 --interval-minutes 0.5 \\
        --baseline-minutes 1 --retention-hours 0.01   # a short check of the bench itself

A benchmark, not a test: it takes as long as it is told to.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon import Daemon  # noqa: E402
from live_servers import Publisher, RtmpServer  # noqa: E402
from videos import make_video  # noqa: E402

from streamguard.inference.testmodel import make_test_bundle  # noqa: E402
from streamguard.media.retention import tree_size  # noqa: E402

SEGMENT = 2


@dataclass
class Sample:
    t: float  # seconds since the tasks started
    rss_mb: float
    open_files: int
    threads: int
    media_bytes: int
    store_bytes: int
    records: int
    errors: int  # -1 records
    reconnects: int
    running: int

    @property
    def disk_bytes(self) -> int:
        return self.media_bytes + self.store_bytes


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def metric_sum(text: str, name: str, label: str = "") -> float:
    pattern = rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M) if label in (m.group(1) or ""))


def sample(d: Daemon, key: str, tasks: list[str], t0: float) -> Sample:
    pid = d.proc.pid
    metrics = d.call("GET", "/metrics").body.decode()
    views = [d.call("GET", f"/v1/streams/{t}", key=key).data for t in tasks]
    store = sum(p.stat().st_size for p in d.data_dir.glob("streamguard.db*"))
    return Sample(
        t=time.monotonic() - t0, rss_mb=proc_status(pid, "VmRSS") / 1024, open_files=len(os.listdir(f"/proc/{pid}/fd")),
        threads=proc_status(pid, "Threads"), media_bytes=tree_size(d.data_dir / "media"), store_bytes=store,
        records=int(metric_sum(metrics, "streamguard_segments_total")),
        errors=int(metric_sum(metrics, "streamguard_segments_total", 'status="-1"')),
        reconnects=int(metric_sum(metrics, "streamguard_source_reconnects_total")),
        running=sum(v["state"] == "running" for v in views))


def show(s: Sample) -> None:
    print(f"{s.t / 60:6.1f} min  rss {s.rss_mb:7.1f} MB  fds {s.open_files:4d}  threads {s.threads:4d}  "
          f"media {s.media_bytes / 2**20:8.1f} MiB  store {s.store_bytes / 2**20:6.1f} MiB  "
          f"records {s.records:6d}  -1 {s.errors:4d}  reconnects {s.reconnects:4d}  running {s.running}",
          flush=True)


def growth(a: float, b: float) -> float:
    return 100.0 * (b - a) / a if a else float("nan")


def error_messages(d: Daemon, key: str, tasks: list[str], limit: int = 5) -> list[str]:
    """The distinct messages of the -1 records (why segments went unmoderated)."""
    seen: dict[str, int] = {}
    for t in tasks:
        after = -1
        while True:
            page = d.call("GET", f"/v1/streams/{t}/records?after={after}&limit=1000", key=key).data
            for r in page["items"]:
                if r["data"]["status"] == -1:
                    msg = re.sub(r"segment \d+", "segment N", r["data"]["message"])
                    seen[msg] = seen.get(msg, 0) + 1
            if not page["items"] or page["next_after"] is None or page["next_after"] == after:
                break
            after = page["next_after"]
    return [f"{n} x {m}" for m, n in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--interval-minutes", type=float, default=5.0, help="between samples")
    ap.add_argument("--baseline-minutes", type=float, default=20.0, help="growth is measured from here to the end")
    ap.add_argument("--retention-hours", type=float, default=0.25, help="storage.media_retention_hours")
    ap.add_argument("--sweep-seconds", type=float, default=30.0, help="storage.sweep_interval_seconds")
    ap.add_argument("--video-seconds", type=float, default=20.0, help="length of the looped file")
    ap.add_argument("--bframes", type=int, default=2,
                    help="B-frames in the looped file (2: like most encoders' defaults; 0: as live encoders send)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "soak", help="daemon data dir (wiped first)")
    args = ap.parse_args()
    baseline = args.baseline_minutes * 60
    if baseline >= args.minutes * 60:
        baseline = args.minutes * 60 / 3
        print(f"note: the run is shorter than the baseline; growth is measured from {baseline / 60:.1f} min")

    out = HERE / "out"
    out.mkdir(exist_ok=True)
    video = out / f"soak_640x360_{args.video_seconds:g}s_bf{args.bframes}.mp4"
    if not video.exists():  # 1 s GOPs, AAC, saturated red in seconds 10-15 (so moderation flags something)
        make_video(video, seconds=args.video_seconds, fps=25, width=640, height=360, gop=25,
                   red=((10.0, 15.0),) if args.video_seconds > 15 else (), bframes=args.bframes)
    bundle = out / "test-bundle"
    if not (bundle / "manifest.json").exists():
        make_test_bundle(bundle)
    shutil.rmtree(args.out, ignore_errors=True)

    env = {"STREAMGUARD_LIMITS__MAX_TASKS": str(max(32, args.streams)),
           "STREAMGUARD_STORAGE__MEDIA_RETENTION_HOURS": str(args.retention_hours),
           "STREAMGUARD_STORAGE__SWEEP_INTERVAL_SECONDS": str(args.sweep_seconds)}
    print(f"soak: {args.streams} streams x {args.minutes:g} min, {SEGMENT} s segments, media retention "
          f"{args.retention_hours:g} h, looping {video.name}", flush=True)
    samples: list[Sample] = []
    pubs: list[Publisher] = []
    with RtmpServer() as rtmp:
        d = Daemon(args.out, bundle, env=env)
        try:
            d.start()
            key = d.create_key("soak")
            tasks = []
            for i in range(args.streams):
                pub = Publisher(video, rtmp.url(f"soak{i}"))
                pub.start()
                pubs.append(pub)
                r = d.call("POST", "/v1/streams", {"url": rtmp.url(f"soak{i}"), "enable_content_moderation": True,
                                                   "segment_seconds": SEGMENT}, key=key)
                assert r.status == 200, r.body
                tasks.append(r.body["data"]["task_id"])
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_at = t0
            while True:
                now = time.monotonic()
                if now >= next_at:
                    samples.append(sample(d, key, tasks, t0))
                    show(samples[-1])
                    next_at += args.interval_minutes * 60
                if now >= end:
                    break
                time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
            messages = error_messages(d, key, tasks)
            for t in tasks:
                d.call("POST", f"/v1/streams/{t}/stop", key=key)
        finally:
            for pub in pubs:
                pub.close()
            d.kill()

    first = next((s for s in samples if s.t >= baseline - 1), samples[-1])
    last = samples[-1]
    rss_g, media_g = growth(first.rss_mb, last.rss_mb), growth(first.media_bytes, last.media_bytes)
    disk_g = growth(first.disk_bytes, last.disk_bytes)
    print(f"\nfrom {first.t / 60:.1f} min to {last.t / 60:.1f} min:")
    print(f"  RSS    {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB       {rss_g:+.1f} %  (target < 5 %)")
    print(f"  media  {first.media_bytes / 2**20:.1f} -> {last.media_bytes / 2**20:.1f} MiB  {media_g:+.1f} %  "
          f"(target < 5 %)")
    print(f"  disk   {first.disk_bytes / 2**20:.1f} -> {last.disk_bytes / 2**20:.1f} MiB  {disk_g:+.1f} %  "
          f"(media + store; the store keeps records for storage.retention_days)")
    print(f"  fds    {first.open_files} -> {last.open_files}, threads {first.threads} -> {last.threads}")
    print(f"  records {last.records}, -1 records {last.errors} (target 0), reconnects {last.reconnects}, "
          f"running at the end {last.running}/{args.streams}")
    for m in messages:
        print(f"  -1: {m}")
    ok = rss_g < 5 and media_g < 5 and last.errors == 0 and last.running == args.streams
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
