"""Inference cost with the shape-real CLIP ViT-B/32 (the real architecture,
random weights: `streamguard models export --random-init vit-b-32`), built once
into bench/out/ (needs the export extra the first time).

For each precision (fp32; int8 from `streamguard.inference.quantize`) and each
ONNX Runtime intra-op thread count, it measures images/s of
  raw      the visual session ClipModel loaded (the project's session
           settings) running plain `session.run` on a ready float32 batch of
           1, 8 and 32;
  batcher  the InferenceBatcher exactly as the daemon wires it
           (Analyzer.create, default inference settings; preprocessing
           included), fed 224x224 uint8 crops by N producer threads, each
           submitting a segment's frames (5, as at 5 s segments and fps 1) and
           waiting for them, as pipelines do.
and prints a table with batcher/raw (raw = the best raw batch size; target
>= 90 %) and int8/fp32 (best of each; target >= 2x).

    python bench/inference.py [--precisions fp32,int8] [--threads 1,2]
        [--batches 1,8,32] [--producers 1,4,16] [--seconds 3]

Each figure runs for --seconds after a warm-up run, so the default full run
takes about three minutes on 2 cores (plus the one-off export and quantization).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from streamguard.analysis.analyzer import Analyzer  # noqa: E402
from streamguard.config import load_settings  # noqa: E402
from shape_real import shape_real_bundle  # noqa: E402
from streamguard.inference.clip import ClipModel  # noqa: E402

FRAMES_PER_SUBMIT = 5


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _load(bundle: Path, threads: int, data_dir: Path, on_batch) -> Analyzer:
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(data_dir)}, "model": {"providers": "cpu", "cpu_threads": threads}})
    return Analyzer.create(settings, bundle, on_batch=on_batch)


def _timed(run_once, seconds: float) -> tuple[int, float]:
    """Items done and elapsed: one warm-up call, then calls until `seconds` (at least two)."""
    run_once()
    done, calls, started = 0, 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        done += run_once()
        calls += 1
    return done, time.perf_counter() - started


def raw_rate(model: ClipModel, batch: int, seconds: float) -> float:
    # The session ClipModel built (the project's options); plain run on a ready batch.
    session = model._visual  # noqa: SLF001
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    crops = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    feed = {name_in: model.preprocess(crops)}

    def once() -> int:
        session.run([name_out], feed)
        return batch
    done, elapsed = _timed(once, seconds)
    return done / elapsed


def batcher_rate(analyzer: Analyzer, batches: list[int], producers: int, seconds: float) -> tuple[float, float]:
    """Images/s and mean batch size with `producers` threads feeding the batcher
    (`batches` is filled by the analyzer's on_batch)."""
    batcher = analyzer.batcher
    crops = np.random.default_rng(1).integers(0, 256, (FRAMES_PER_SUBMIT, 224, 224, 3), dtype=np.uint8)
    wait([batcher.submit(c) for c in crops])  # warm-up
    batches.clear()
    stop = threading.Event()
    counts = [0] * producers

    def produce(i: int) -> None:
        while not stop.is_set():
            futures = [batcher.submit(c) for c in crops]
            wait(futures)
            counts[i] += len(futures)

    threads = [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(producers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, (sum(batches) / len(batches) if batches else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,int8", help="comma-separated: fp32,int8")
    ap.add_argument("--threads", type=_csv_ints, default=[1, 2], help="intra-op thread counts (1,2)")
    ap.add_argument("--batches", type=_csv_ints, default=[1, 8, 32], help="raw session batch sizes (1,8,32)")
    ap.add_argument("--producers", type=_csv_ints, default=[1, 4, 16], help="batcher producer threads (1,4,16)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure (3)")
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not set(precisions) <= {"fp32", "int8"}:
        ap.error("--precisions takes fp32 and/or int8")

    OUT.mkdir(exist_ok=True)
    # The analyzer warns at each load that the bundle is not a model: known here.
    logging.getLogger(Analyzer.__module__).setLevel(logging.ERROR)
    bundles = {p: shape_real_bundle(p) for p in precisions}
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{FRAMES_PER_SUBMIT} frames per producer submit; {args.seconds:g} s per figure")

    results: list[dict] = []
    best: dict[tuple[str, int], float] = {}
    print(f"{'precision':9} {'threads':>7} {'mode':<14} {'images/s':>9} {'vs raw best':>11} {'mean batch':>10}")
    with tempfile.TemporaryDirectory() as data_dir:
        for precision in precisions:
            for threads in args.threads:
                batches: list[int] = []
                analyzer = _load(bundles[precision], threads, Path(data_dir), lambda n, _t: batches.append(n))
                raw = {b: raw_rate(analyzer.model, b, args.seconds) for b in args.batches}
                peak = max(raw.values()) if raw else float("nan")
                best[(precision, threads)] = peak
                for b, rate in raw.items():
                    print(f"{precision:9} {threads:>7} {'raw b=' + str(b):<14} {rate:9.1f} {rate / peak:10.0%} "
                          f"{b:>10}", flush=True)
                    results.append(dict(precision=precision, threads=threads, mode="raw", batch=b, rate=rate))
                for n in args.producers:
                    rate, mean_batch = batcher_rate(analyzer, batches, n, args.seconds)
                    print(f"{precision:9} {threads:>7} {'batcher N=' + str(n):<14} {rate:9.1f} {rate / peak:10.0%} "
                          f"{mean_batch:10.1f}", flush=True)
                    results.append(dict(precision=precision, threads=threads, mode="batcher", producers=n,
                                        rate=rate, mean_batch=mean_batch, ratio_vs_raw_best=rate / peak))
                analyzer.close()
    if {"fp32", "int8"} <= set(precisions):
        for threads in args.threads:
            ratio = best[("int8", threads)] / best[("fp32", threads)]
            print(f"int8/fp32 at {threads} thread(s), best raw: {ratio:.2f}x (target >= 2x)")
    (OUT / "inference.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
