"""Scan throughput: the pipeline against plain PyAV doing the minimum work.

Input: 60 s of 1280x720 30 fps H.264 with a 2 s GOP, generated once into
bench/out/ in two encodings:
  typical        what `ffmpeg -c:v libx264 -g 60` writes: preset medium,
                 3 B-frames (the non-reference ones need no decoding), CABAC,
                 deblocking;
  all-reference  preset ultrafast without B-frames: every frame is a
                 reference and cheap to decode, so lazy decoding saves least
                 (the worst case for the ratio).
Pipeline: 5 s segments, fps 1, source rendition (remux) and moderation with
the test model. Baseline, in the same process: PyAV decodes every frame and
scales one per second to 224x224 with the pipeline's own scaler (so only
decoding and the rest of the pipeline differ).

Model: the test bundle (default), `--model DIR`, or `--shape-real [fp32|int8]`
(the real ViT-B/32 architecture with random weights, bench/shape_real.py);
ONNX Runtime gets one thread per pinned core.

Prints, per input, frames decoded per sampled frame, the real-time factor and
the wall-time ratio pipeline/baseline, and the time the image encoder took
(with a real-sized model, inference rather than decoding sets the pace).
Pinned to one core by default.

    python bench/scan_throughput.py [--cores 1] [--repeat 3] [--input typical|all-reference]
        [--model DIR | --shape-real [fp32|int8]]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import av  # noqa: E402

from streamguard.config import load_settings  # noqa: E402
from streamguard.inference.testmodel import make_test_bundle  # noqa: E402
from streamguard.media.scaler import CentreCropScaler  # noqa: E402
from streamguard.pipeline.segments import PipelineOptions  # noqa: E402
from streamguard.services.scan import run_scan  # noqa: E402
from videos import make_video  # noqa: E402

SECONDS, FPS, GOP = 60, 30, 60


INPUTS = {  # name -> (file, encoder settings)
    "typical": ("bench_720p30_gop2s_medium.mp4", {"preset": "medium", "bframes": 3}),
    "all-reference": ("bench_720p30_gop2s.mp4", {"preset": "ultrafast", "bframes": 0}),
}


def input_video(out: Path, name: str) -> Path:
    filename, encoding = INPUTS[name]
    path = out / filename
    if not path.exists():
        print(f"generating the 60 s 720p30 {name} input (once; up to a minute or two) ...", file=sys.stderr)
        make_video(path.with_suffix(".tmp.mp4"), seconds=SECONDS, fps=FPS, width=1280, height=720,
                   gop=GOP, red=((20, 25),), encoder_threads=0, **encoding)
        path.with_suffix(".tmp.mp4").rename(path)
    return path


def baseline(path: Path) -> tuple[float, int]:
    """Decode every frame; resize one per second (the naive way)."""
    started = time.perf_counter()
    decoded = 0
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        v.codec_context.thread_count = 1
        next_t = 0.0
        scale = CentreCropScaler(224)  # the pipeline's own resize: only decoding differs
        for frame in c.decode(v):
            decoded += 1
            t = float(frame.pts * v.time_base)
            if t >= next_t:
                scale(frame)
                next_t += 1.0
    return time.perf_counter() - started, decoded


def resolve_bundle(model: Path | None, shape_real: str | None, out: Path) -> Path:
    """--model, else --shape-real's cached bundle, else the test bundle."""
    if model is not None:
        return model
    if shape_real:
        sys.path.insert(0, str(HERE))
        from shape_real import shape_real_bundle
        return shape_real_bundle(shape_real)
    bundle = out / "test-bundle"
    if not (bundle / "manifest.json").exists():
        make_test_bundle(bundle)
    return bundle


THREADS = 1  # ONNX Runtime threads: the pinned cores


def pipeline(path: Path, bundle: Path, out: Path) -> tuple[float, int]:
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(out / "data")}, "model": {"cpu_threads": THREADS, "providers": "cpu"},
        "pipeline": {"decode_threads": 1}})
    opts = PipelineOptions(segment_seconds=5, fps=1, moderate=True)
    sink = io.StringIO()
    started = time.perf_counter()
    rc = asyncio.run(run_scan([str(path)], settings, opts, out_dir=out / "hls", model_dir=str(bundle),
                              stdout=sink, stderr=sys.stderr))
    elapsed = time.perf_counter() - started
    assert rc == 0, "pipeline failed"
    return elapsed, sink.getvalue().count("\n")


def sampler_counts(path: Path, bundle: Path, out: Path) -> tuple[int, int]:
    """Frames decoded and sampled by one real ingest of this input."""
    from streamguard.analysis.analyzer import Analyzer
    from streamguard.media.source import MediaSource, SourceOptions
    from streamguard.pipeline.segments import ingest

    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(out / "data")},
                                                    "model": {"cpu_threads": THREADS, "providers": "cpu"}})
    encoder = [0.0]
    analyzer = Analyzer.create(settings, bundle, on_batch=lambda _n, s: encoder.__setitem__(0, encoder[0] + s))
    src = MediaSource(str(path), SourceOptions())
    src.open()
    try:
        reused: list[int] = []
        result = ingest(src, PipelineOptions(segment_seconds=5, fps=1, moderate=True), out / "hls-count", analyzer,
                        lambda closed: reused.append(closed.frames_reused))
    finally:
        src.close()
        analyzer.close()
    sampler_counts.encoder_seconds = encoder[0]  # type: ignore[attr-defined]
    sampler_counts.reused = sum(reused)  # type: ignore[attr-defined]
    return result.sampler.frames_decoded, result.sampler.frames_sampled


def measure(name: str, path: Path, bundle: Path, out: Path, repeat: int) -> None:
    pipeline(path, bundle, out)  # warm-up: model load, prompt cache, page cache
    base_t, pipe_t = [], []
    for _ in range(repeat):
        t, decoded_all = baseline(path)
        base_t.append(t)
        t, records = pipeline(path, bundle, out)
        pipe_t.append(t)
    decoded, sampled = sampler_counts(path, bundle, out)
    # Runs alternate, so each pair saw the same machine load; the median of
    # the per-pair ratios is robust to a noisy neighbour.
    ratio = statistics.median(pt / bt for pt, bt in zip(pipe_t, base_t))
    b, p = min(base_t), min(pipe_t)
    print(f"[{name}] {path.name}: {records} records")
    print(f"  frames decoded per sampled frame: {decoded / sampled:.2f} "
          f"(pipeline {decoded}/{sampled}; baseline decodes {decoded_all})")
    print(f"  baseline (decode all + scale 1/s), best: {b:.2f} s = {SECONDS / b:.1f}x real time")
    print(f"  pipeline, best: {p:.2f} s = real-time factor {SECONDS / p:.1f}x")
    print(f"  wall-time ratio pipeline/baseline (median of pairs): {ratio:.2f}; of best times: {p / b:.2f}")
    enc = sampler_counts.encoder_seconds  # type: ignore[attr-defined]
    encoded = sampled - sampler_counts.reused  # type: ignore[attr-defined]
    print(f"  image encoder: {enc:.2f} s for {encoded} frames ({sampled - encoded} of {sampled} reused; "
          f"{encoded / max(enc, 1e-9):.1f} frames/s; {100 * enc / p:.0f}% of the best pipeline run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (0 = no pinning)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--input", choices=sorted(INPUTS), action="append",
                    help="input encoding(s) to measure (default: all)")
    ap.add_argument("--model", type=Path, help="model bundle directory (default: the test bundle)")
    ap.add_argument("--shape-real", nargs="?", const="fp32", choices=("fp32", "int8"),
                    help="the shape-real ViT-B/32 bundle (built and cached in bench/out/)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.cores or (os.cpu_count() or 1)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    names = args.input or list(INPUTS)
    paths = {name: input_video(out, name) for name in names}  # generated before pinning: encoding is slow
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    bundle = resolve_bundle(args.model, args.shape_real, out)
    cores = args.cores or os.cpu_count()
    print(f"input: {SECONDS} s 1280x720 {FPS} fps H.264, GOP {GOP / FPS:.0f} s; segments 5 s, fps 1, "
          f"source rendition + moderation ({bundle.name}); {cores} core(s); {args.repeat} alternating runs")
    for name in names:
        measure(name, paths[name], bundle, out, args.repeat)


if __name__ == "__main__":
    main()
