"""The encoded ladder against the ffmpeg CLI doing the same ladder.

Input: a generated 1080p30 H.264 + AAC file (`--seconds`, 60 by default).
Ours: `streamguard scan --renditions 360p,480p,720p,1080p --x264-preset fast
--moderate` with the test bundle (one decode feeding four libx264 rungs, the
frame sampler and the model). Theirs: one ffmpeg process with one decode, a
split filter, four bicubic scales and four libx264 encodes at the same preset
and rate control (b:v = maxrate = table, bufsize = 2 x table), AAC at the
table's rates, keyframes forced at every segment boundary, the HLS muxer.
The two run alternately (`--runs` each) in the same invocation; prints each
wall time, the wall ratio ours/ffmpeg of the medians (target <= 1.05) and the
real-time factors (input seconds / wall seconds).

    PYTHONPATH=. python bench/ladder.py [--seconds 60] [--runs 2] [--preset fast]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamguard.media.ladder import PRESETS

RUNGS = ["360p", "480p", "720p", "1080p"]


def make_input(path: Path, seconds: int) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "128k", "-ac", "2", str(path)], check=True)


def ours(src: Path, out: Path, bundle: Path, preset: str, segment: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", str(src), "--out", str(out),
                           "--renditions", ",".join(RUNGS), "--x264-preset", preset, "--moderate",
                           "--model", str(bundle), "--segment-seconds", str(segment),
                           "--data-dir", str(out.parent / "data")],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"streamguard scan failed: {proc.stderr[-2000:]}")
    return wall


def ffmpeg_command(src: Path, out: Path, preset: str, segment: int) -> list[str]:
    split = ";".join([f"[0:v]split={len(RUNGS)}" + "".join(f"[s{i}]" for i in range(len(RUNGS)))]
                     + [f"[s{i}]scale={PRESETS[n].width}:{PRESETS[n].height}:flags=bicubic[v{i}]"
                        for i, n in enumerate(RUNGS)])
    cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(src), "-filter_complex", split]
    for i, name in enumerate(RUNGS):
        p = PRESETS[name]
        cmd += ["-map", f"[v{i}]", "-map", "0:a",
                f"-c:v:{i}", "libx264", f"-preset:v:{i}", preset, f"-b:v:{i}", str(p.video_bitrate),
                f"-maxrate:v:{i}", str(p.video_bitrate), f"-bufsize:v:{i}", str(2 * p.video_bitrate),
                f"-c:a:{i}", "aac", f"-b:a:{i}", str(p.audio_bitrate)]
    cmd += ["-force_key_frames", f"expr:gte(t,n_forced*{segment})", "-f", "hls", "-hls_time", str(segment),
            "-hls_playlist_type", "vod", "-master_pl_name", "master.m3u8",
            "-var_stream_map", " ".join(f"v:{i},a:{i},name:{n}" for i, n in enumerate(RUNGS)),
            "-hls_segment_filename", str(out / "%v" / "segment_%03d.ts"), str(out / "%v" / "playlist.m3u8")]
    return cmd


def theirs(src: Path, out: Path, preset: str, segment: int) -> float:
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run(ffmpeg_command(src, out, preset, segment), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ffmpeg failed: {proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="input length (60)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each, alternating (2)")
    ap.add_argument("--preset", default="fast", help="x264 preset (fast)")
    ap.add_argument("--segment-seconds", type=int, default=5)
    args = ap.parse_args()
    from streamguard.inference.testmodel import make_test_bundle

    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        root = Path(tmp)
        src = root / "in.mp4"
        make_input(src, args.seconds)
        bundle = root / "bundle"
        make_test_bundle(bundle)
        walls: dict[str, list[float]] = {"streamguard": [], "ffmpeg": []}
        for run in range(args.runs):
            for who in ("streamguard", "ffmpeg"):
                out = root / f"{who}-{run}" / "out"
                out.parent.mkdir()
                wall = ours(src, out, bundle, args.preset, args.segment_seconds) if who == "streamguard" \
                    else theirs(src, out, args.preset, args.segment_seconds)
                walls[who].append(wall)
                print(f"run {run + 1} {who:12s} {wall:7.2f} s  (real-time factor {args.seconds / wall:.2f}x)",
                      flush=True)
                shutil.rmtree(out.parent)
        ours_med, theirs_med = statistics.median(walls["streamguard"]), statistics.median(walls["ffmpeg"])
        print(f"\n{args.seconds} s 1080p30 -> {','.join(RUNGS)} at preset {args.preset}, {os.cpu_count()} cores "
              f"(load avg {os.getloadavg()[0]:.1f})")
        print(f"streamguard (with moderation): median {ours_med:.2f} s, real-time factor {args.seconds / ours_med:.2f}x")
        print(f"ffmpeg CLI ladder:             median {theirs_med:.2f} s, real-time factor "
              f"{args.seconds / theirs_med:.2f}x")
        print(f"wall ratio streamguard/ffmpeg: {ours_med / theirs_med:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
