"""The test bundle's planted behaviour through the project's own scoring, the
prompt-embedding cache, and the batcher."""


import numpy as np
import pytest

from streamguard.config import ModelSettings
from streamguard.inference.batcher import InferenceBatcher
from streamguard.inference.clip import ClipModel
from streamguard.analysis.categories import CATEGORY_NAMES, MODERATION_CATEGORIES
from streamguard.analysis.scoring import ModerationScorer, violations
from streamguard.errors import ModelError


@pytest.fixture(scope="module")
def model(test_bundle, tmp_path_factory):
    return ClipModel(test_bundle, ModelSettings(providers="cpu"), tmp_path_factory.mktemp("cache"))


def frames_with_red_fraction(fractions, size=224, seed=0):
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 180, (len(fractions), size, size, 3), dtype=np.uint8)
    for i, frac in enumerate(fractions):
        rows = int(round(frac * size))
        out[i, :rows] = (rng.integers(200, 256), rng.integers(0, 41), rng.integers(0, 41))
    return out


def test_thirteen_reference_categories():
    assert len(MODERATION_CATEGORIES) == 13
    assert CATEGORY_NAMES[0] == "nudity_explicit" and CATEGORY_NAMES[-1] == "harassment"
    assert {c.name: c.severity for c in MODERATION_CATEGORIES}["violence"] == "high"


def test_planted_behaviour(model, tmp_path):
    scorer = ModerationScorer(model, tmp_path)
    scores = scorer.score(model.encode_images(frames_with_red_fraction([1.0, 0.7, 0.55, 0.45, 0.2, 0.0])))
    v = CATEGORY_NAMES.index("violence")
    others = [i for i in range(len(CATEGORY_NAMES)) if i != v]
    for row in scores[:3]:  # saturated-red majority
        assert row[v] >= 0.9
        assert (row[others] < 0.1).all()
    for row in scores[3:]:  # no red majority
        assert (row < 0.1).all()


def test_prompt_embeddings_cached_on_disk(model, tmp_path):
    first = ModerationScorer(model, tmp_path)
    tokens = first.prepare()
    assert tokens > 0 and first.cache_path.is_file()
    assert first.prepare() == 0  # already in memory
    second = ModerationScorer(model, tmp_path)
    assert second.prepare() == 0  # loaded from disk, nothing encoded
    emb = model.encode_images(frames_with_red_fraction([1.0]))
    assert np.allclose(first.score(emb), second.score(emb))


def test_violations_sorted_with_severity():
    hits = violations({"weapons": 0.4, "violence": 0.9, "gore_graphic": 0.1}, 0.3)
    assert [(h.category, h.severity) for h in hits] == [("violence", "high"), ("weapons", "medium")]


def test_batcher_batches_across_submitters(model):
    sizes = []
    batcher = InferenceBatcher(model.encode_images, max_batch=8, max_wait=0.2,
                               on_batch=lambda n, _t: sizes.append(n))
    try:
        futs = [batcher.submit(f) for f in frames_with_red_fraction([1.0] * 10)]
        out = np.stack([f.result(timeout=10) for f in futs])
    finally:
        batcher.close()
    assert out.shape == (10, model.manifest.embedding_dim)
    assert sizes[0] == 8 and sum(sizes) == 10


def test_batcher_failure_reaches_every_caller():
    def broken(_x):
        raise RuntimeError("boom")
    batcher = InferenceBatcher(broken, max_batch=4, max_wait=0.05)
    try:
        futs = [batcher.submit(np.zeros((4, 4, 3), np.uint8)) for _ in range(3)]
        for f in futs:
            with pytest.raises(RuntimeError, match="boom"):
                f.result(timeout=5)
    finally:
        batcher.close()


def test_missing_or_broken_bundle_is_a_clear_error(tmp_path, test_bundle):
    with pytest.raises(ModelError, match="no model bundle"):
        ClipModel(tmp_path, ModelSettings(), tmp_path / "c")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in test_bundle.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "visual.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="visual.onnx is 8 bytes, the manifest says"):
        ClipModel(broken, ModelSettings(), tmp_path / "c")


def test_gpu_provider_requested_without_gpu_is_an_error(test_bundle, tmp_path):
    from streamguard.inference.session import cuda_device_count
    if cuda_device_count():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelError, match="no usable GPU"):
        ClipModel(test_bundle, ModelSettings(providers="cuda"), tmp_path)


def test_auto_provider_falls_back_to_cpu_quietly(test_bundle, tmp_path, capfd):
    m = ClipModel(test_bundle, ModelSettings(providers="auto"), tmp_path)
    assert m.active_providers[-1] == "CPUExecutionProvider"
    err = capfd.readouterr().err
    assert "CUDA" not in err and "Error" not in err


async def test_segment_frames_awaited_with_one_loop_wakeup():
    import asyncio
    import threading
    from concurrent.futures import CancelledError, Future

    from streamguard.analysis.analyzer import gather_threadsafe

    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    futures = [Future() for _ in range(8)]
    threading.Thread(target=lambda: [f.set_result(i) for i, f in enumerate(reversed(futures))]).start()
    assert await gather_threadsafe(futures) == list(range(7, -1, -1))
    assert wakeups == 1
    assert await gather_threadsafe([]) == []

    withdrawn = [Future(), Future()]
    threading.Thread(target=lambda: (withdrawn[0].set_result(1), withdrawn[1].cancel())).start()
    with pytest.raises(CancelledError):
        await gather_threadsafe(withdrawn)
