"""Duplicate-frame reuse (analysis/reuse.py), the two-stage batcher and IO
binding: real encoded video through the real pipeline and test model."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from concurrent.futures import Future
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from streamguard.analysis.analyzer import Analyzer
from streamguard.analysis.reuse import StreamReuse, follow, nearly_identical
from streamguard.analysis.scoring import ModerationScorer
from streamguard.config import ModelSettings, load_settings
from streamguard.inference.batcher import InferenceBatcher
from streamguard.inference.clip import ClipModel
from streamguard.media.source import MediaSource, SourceOptions
from streamguard.pipeline.segments import ClosedSegment, PipelineOptions, ingest
from streamguard.services.scan import run_scan

W, H, FPS = 640, 360, 25


def slide(seed: int = 1) -> np.ndarray:
    """A static 'slide': light background, boxes and text-like bars (sharp
    edges, where compression noise is largest)."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 235, np.uint8)
    for _ in range(30):
        x, y = rng.integers(0, W - 100), rng.integers(0, H - 20)
        img[y:y + rng.integers(3, 20), x:x + rng.integers(10, 100)] = rng.integers(0, 255, 3)
    return img


def with_red(img: np.ndarray, fraction: float) -> np.ndarray:
    """Saturated red over the centre `fraction` of the frame (inside CLIP's centre crop)."""
    out = img.copy()
    side = int(np.sqrt(fraction) * H)  # a square of fraction * H^2: share of the 360x360 crop
    y0, x0 = (H - side) // 2, (W - side) // 2
    out[y0:y0 + side, x0:x0 + side] = (255, 0, 0)
    return out


def encode(path: Path, frames: list[np.ndarray], noise: float = 2.0) -> Path:
    """One picture per second, repeated at 25 fps with fresh sensor-like noise
    per frame, x264 preset medium (the typical encoder defaults)."""
    rng = np.random.default_rng(7)
    out = av.open(str(path), "w")
    v = out.add_stream("libx264", rate=FPS)
    v.width, v.height, v.pix_fmt = W, H, "yuv420p"
    v.options = {"g": "25", "preset": "medium", "threads": "1"}  # 1 s GOP: cuts at 5 s
    i = 0
    for picture in frames:
        for _ in range(FPS):
            img = np.clip(picture + rng.normal(0, noise, picture.shape), 0, 255).astype(np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            i += 1
            for p in v.encode(f):
                out.mux(p)
    for p in v.encode(None):
        out.mux(p)
    out.close()
    return path


@pytest.fixture(scope="module")
def static_video(tmp_path_factory) -> Path:
    """10 s: a static slide (0-5 s), mostly red over it (6-7 s), the slide again (8-9 s)."""
    s = slide()
    pictures = [s] * 6 + [with_red(s, 0.8)] * 2 + [s] * 2
    return encode(tmp_path_factory.mktemp("reuse") / "static.mp4", pictures)


@pytest.fixture(scope="module")
def patch_video(tmp_path_factory) -> Path:
    """6 s: a static slide, then a red patch over 10 % of the frame from 3 s on."""
    s = slide(2)
    return encode(tmp_path_factory.mktemp("reuse") / "patch.mp4", [s] * 3 + [with_red(s, 0.1)] * 3)


def settings_for(tmp_path: Path, reuse: bool, io_binding: bool = True):
    return load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "data")}, "model": {"providers": "cpu", "cpu_threads": 1},
        "inference": {"reuse_duplicates": reuse, "io_binding": io_binding}})


def closed_segments(video: Path, bundle: Path, tmp_path: Path, reuse: bool) -> list[ClosedSegment]:
    analyzer = Analyzer.create(settings_for(tmp_path, reuse), bundle)
    closed: list[ClosedSegment] = []
    src = MediaSource(str(video), SourceOptions())
    src.open()
    try:
        ingest(src, PipelineOptions(segment_seconds=5, fps=1, moderate=True), tmp_path / f"hls-{reuse}",
               analyzer, closed.append)
        for c in closed:
            for _, fut in c.frames:
                fut.result(timeout=30)
    finally:
        src.close()
        analyzer.close()
    return closed


def scan_records(video: Path, bundle: Path, tmp_path: Path, reuse: bool) -> list[dict]:
    out = io.StringIO()
    rc = asyncio.run(run_scan([str(video)], settings_for(tmp_path, reuse), PipelineOptions(5, 1, 0.3, True),
                              out_dir=tmp_path / f"scan-{reuse}", model_dir=str(bundle), stdout=out,
                              stderr=io.StringIO()))
    assert rc == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


# --- the bound ----------------------------------------------------------------------


def test_bound_passes_noise_and_refuses_changes_that_matter():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    assert nearly_identical(base, noisy)
    assert nearly_identical(base, base)
    patch = base.copy()
    patch[80:151, 80:151] = (255, 0, 0)  # ~10 % of the crop
    assert not nearly_identical(base, patch)
    cut = rng.integers(0, 256, base.shape, dtype=np.uint8)  # a scene cut
    assert not nearly_identical(base, cut)
    speck = base.copy()
    speck[100:103, 100:103] = base[100:103, 100:103] ^ 0x80  # a few pixels changed starkly
    assert not nearly_identical(base, speck)
    faint = base.astype(int)
    faint[96:104, 96:104] += 12  # one 8x8 block, 12 levels: coherent, if faint
    assert not nearly_identical(base, np.clip(faint, 0, 255).astype(np.uint8))
    shifted = np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8)  # the whole picture brightened
    assert not nearly_identical(base, shifted)


def test_drift_is_measured_from_the_last_encoded_frame():
    """One level more per step: each step is within the bound, the sum is not."""
    encoded: list[np.ndarray] = []

    def encode_now(crop: np.ndarray) -> Future:
        encoded.append(crop)
        fut: Future = Future()
        fut.set_result(np.ones(4, np.float32))
        return fut

    reuse = StreamReuse(encode_now)
    base = np.full((224, 224, 3), 100, np.uint8)
    flags = [reuse.submit(base + k)[1] for k in range(6)]
    assert flags == [False, True, True, False, True, True]  # mean diff 3 > 2 from the anchor at step 3
    assert len(encoded) == 2


def test_reused_future_is_independent_of_its_anchor():
    anchor: Future = Future()
    derived = follow(anchor)
    assert derived.cancel() and not anchor.cancelled()
    other = follow(anchor)
    anchor.set_running_or_notify_cancel()
    anchor.set_result(np.arange(3.0))
    assert np.array_equal(other.result(timeout=1), np.arange(3.0))
    failed: Future = Future()
    fails = follow(failed)
    failed.set_exception(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        fails.result(timeout=1)


def test_disabled_reuse_encodes_every_frame():
    calls = []

    def encode_now(crop: np.ndarray) -> Future:
        calls.append(1)
        return Future()

    reuse = StreamReuse(encode_now, enabled=False)
    base = np.zeros((8, 8, 3), np.uint8)
    assert [reuse.submit(base)[1] for _ in range(3)] == [False] * 3 and len(calls) == 3


# --- the pipeline ---------------------------------------------------------------------


def test_static_scene_reuses_and_moderates_the_same(static_video, test_bundle, tmp_path):
    on = scan_records(static_video, test_bundle, tmp_path, reuse=True)
    off = scan_records(static_video, test_bundle, tmp_path, reuse=False)
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        ma, mb = a["data"]["data"]["content_moderation"], b["data"]["data"]["content_moderation"]
        assert ma["frames_processed"] == mb["frames_processed"] == 5
        assert ma["violations"] == mb["violations"] and ma["flagged_frames"] == mb["flagged_frames"]
        assert ma["has_unsafe_content"] == mb["has_unsafe_content"]
        for k in ma["scores"]:
            assert abs(ma["scores"][k] - mb["scores"][k]) < 0.005, k
        assert a["data"]["token"]["video_tokens"] < b["data"]["token"]["video_tokens"] == 5 * 50
    # the red seconds are flagged either way
    second = on[1]["data"]["data"]["content_moderation"]
    assert [f["time"] for f in second["flagged_frames"]] == ["6.000", "7.000"]
    # 0-4 s: one slide, encoded once; 5-9 s: slide (reused), red (encoded), red
    # (reused), slide (encoded: it differs from the red anchor), slide (reused)
    assert [r["data"]["token"]["video_tokens"] for r in on] == [1 * 50, 2 * 50]


def test_reuse_counter_and_red_patch_never_reused(static_video, patch_video, test_bundle, tmp_path):
    closed = closed_segments(static_video, test_bundle, tmp_path, reuse=True)
    assert [c.frames_reused for c in closed] == [4, 3]
    assert [c.frames_encoded for c in closed] == [1, 2]
    assert [c.frames_reused for c in closed_segments(static_video, test_bundle, tmp_path, reuse=False)] == [0, 0]
    patch = closed_segments(patch_video, test_bundle, tmp_path, reuse=True)
    frames = [f for c in patch for f in c.frames]
    assert len(frames) == 6
    # 0-2 s the slide (encoded once), 3 s the patch appears: encoded (had it been
    # reused, 5 of 6 would be); 4-5 s reuse the patched frame
    assert [c.frames_reused for c in patch] == [3, 1]


def test_reused_pairs_embed_alike(test_bundle, tmp_path):
    """Pairs within the bound have embedding cosine >= 0.999 and scores within
    0.005 (test model; bench/shape_real.py --check-reuse does the same
    with a shape-real ViT-B/32)."""
    model = ClipModel(test_bundle, ModelSettings(providers="cpu"), tmp_path)
    scorer = ModerationScorer(model, tmp_path)
    scorer.prepare()
    rng = np.random.default_rng(3)
    bases = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    for frac in (0.3, 0.45, 0.55, 0.7, 1.0):  # around the planted behaviour's edge
        img = np.full((224, 224, 3), 128, np.uint8)
        img[: int(224 * frac)] = (255, 0, 0)
        bases.append(img)
    pairs = []
    for base in bases:
        for _ in range(4):
            other = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
            assert nearly_identical(base, other)
            pairs.append((base, other))
    a = model.encode_images(np.stack([p[0] for p in pairs]))
    b = model.encode_images(np.stack([p[1] for p in pairs]))
    assert (np.sum(a * b, axis=1) >= 0.999).all()
    assert np.abs(scorer.score(a) - scorer.score(b)).max() < 0.005


# --- IO binding and the batcher --------------------------------------------------------


def test_io_binding_gives_the_plain_embeddings(test_bundle, tmp_path):
    model = ClipModel(test_bundle, ModelSettings(providers="cpu"), tmp_path)
    crops = np.random.default_rng(5).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    crops[2] = (255, 0, 0)
    plain = model.encode_images(crops)
    model.use_io_binding()
    assert model._bound is not None and model._bound.device == "cpu"
    bound = model.encode_images(crops)
    np.testing.assert_array_equal(bound, plain)
    # and through the two-stage batcher, prepared in chunks
    batcher = InferenceBatcher(model.encode_prepared, prepare=model.preprocess, max_batch=4, max_wait=0.05)
    try:
        futs = [batcher.submit(c) for c in crops]
        np.testing.assert_array_equal(np.stack([f.result(timeout=10) for f in futs]), plain)
    finally:
        batcher.close()


def test_batch_budget_caps_batches_and_prepare_overlaps_runs():
    sizes: list[int] = []
    prepared_during_run: list[bool] = []

    def encode(x: np.ndarray) -> np.ndarray:
        time.sleep(0.01 * len(x))  # 10 ms a frame
        return x.reshape(len(x), -1)[:, :2].astype(np.float32)

    def prepare(x: np.ndarray) -> np.ndarray:
        prepared_during_run.append(not batcher._idle.is_set())  # a batch is with the encoder
        return x

    batcher = InferenceBatcher(encode, prepare=prepare, max_batch=32, max_wait=0.005, budget=0.05,
                               on_batch=lambda n, _t: sizes.append(n))
    try:
        first = batcher.submit(np.zeros((2, 2, 3), np.uint8))
        first.result(timeout=5)  # measures 10 ms a frame
        futs = [batcher.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(40)]
        out = [f.result(timeout=10) for f in futs]
    finally:
        batcher.close()
    assert [int(o[0]) for o in out] == [i for i in range(40)]
    assert max(sizes) <= 5 and sum(sizes) == 41  # 50 ms budget / 10 ms a frame
    assert any(prepared_during_run)


def test_withdrawn_frames_are_not_run():
    ran: list[int] = []
    gate = threading.Event()

    def encode(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        ran.append(len(x))
        return np.zeros((len(x), 2), np.float32)

    batcher = InferenceBatcher(encode, max_batch=8, max_wait=0.01)
    try:
        busy = batcher.submit(np.zeros((2, 2, 3), np.uint8))
        time.sleep(0.05)  # the first batch is running
        futs = [batcher.submit(np.zeros((2, 2, 3), np.uint8)) for _ in range(4)]
        futs[1].cancel()
        futs[3].cancel()
        gate.set()
        busy.result(timeout=5)
        assert all(f.result(timeout=5).shape == (2,) for f in (futs[0], futs[2]))
    finally:
        batcher.close()
    assert ran == [1, 2]
