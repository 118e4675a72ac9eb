"""The test bundle's planted behaviour through the project's own scoring, the
calibration of the engine (every concept scored alike), per-category
thresholds, the prompt-embedding cache, and the batcher."""


import numpy as np
import pytest

from streamguard.config import ModelSettings
from streamguard.inference.batcher import InferenceBatcher
from streamguard.inference.clip import ClipModel
from streamguard.analysis.categories import CATEGORY_NAMES, MODERATION_CATEGORIES, SAFE_CONCEPTS
from streamguard.analysis.scoring import MODERATION_CONCEPTS, ModerationScorer, category_thresholds, violations
from streamguard.inference.clip import l2_normalize
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


def _ensembles(prompts: np.ndarray) -> list[np.ndarray]:
    """The moderation bank's per-concept prompt embeddings (categories, then safe concepts)."""
    return MODERATION_CONCEPTS.split(prompts)


def _old_scores(image: np.ndarray, prompts: np.ndarray, scale: float) -> np.ndarray:
    """The engine before issue 11: a category is its renormalised mean prompt
    embedding, each safe prompt stands alone."""
    groups = _ensembles(prompts)
    n = len(MODERATION_CATEGORIES)
    cats = l2_normalize(np.stack([g.mean(axis=0) for g in groups[:n]]))
    safe = np.concatenate(groups[n:])
    cat, other = scale * image @ cats.T, scale * image @ safe.T
    lse = other.max() + np.log(np.exp(other - other.max()).sum())
    return 1 / (1 + np.exp(-(cat - lse)))


def test_test_bundle_ensembles_are_not_degenerate(model, tmp_path):
    """Phrasings of one concept differ, as with a real CLIP: an ensemble's mean
    is not unit length, by a different amount per concept (else a bias that
    depends on it could not show here)."""
    prompts = ModerationScorer(model, tmp_path).bank.embeddings
    norms = np.array([np.linalg.norm(g.mean(axis=0)) for g in _ensembles(prompts)])
    assert len(norms) == len(MODERATION_CATEGORIES) + len(SAFE_CONCEPTS)
    assert norms.max() < 0.99 and norms.max() - norms.min() > 0.05, norms


def test_a_frame_that_says_nothing_scores_the_same_for_every_category(model, tmp_path):
    """A frame exactly as close to every prompt (categories' and safe scenes')
    is evidence for none: every category must score the same, 1/(1 + number of
    safe concepts). The old formula gave each category 1/|mean| of its
    ensemble extra cosine (here up to 0.65 for one category, 0.05 for another),
    so this fails for it and holds for the engine of every-concept-alike."""
    scorer = ModerationScorer(model, tmp_path)
    prompts = scorer.bank.embeddings.astype(np.float64)
    x = prompts.T @ np.linalg.solve(prompts @ prompts.T, np.ones(len(prompts)))  # equal cosine to all
    x /= np.linalg.norm(x)
    cos = prompts @ x
    assert cos.max() - cos.min() < 1e-4 and cos.min() > 0.05
    image = x[None].astype(np.float32)

    fair = 1 / (1 + len(SAFE_CONCEPTS))
    assert np.allclose(scorer.score(image), fair, atol=1e-3)

    old = _old_scores(image[0], prompts, model.logit_scale)
    assert old.max() - old.min() > 0.3, old  # the bias this test exists to catch
    assert old.max() > 0.3  # ... enough to flag a frame that shows nothing


def test_scores_do_not_depend_on_how_often_a_phrasing_is_listed(model, tmp_path):
    """A concept's likelihood is the mean of its phrasings': listing each of
    its prompts twice changes nothing (a sum would gain log 2)."""
    from streamguard.analysis.scoring import ConceptSet, concept_logits
    scorer = ModerationScorer(model, tmp_path)
    blocks = MODERATION_CONCEPTS.split(np.array(MODERATION_CONCEPTS.prompts))
    doubled = ConceptSet("doubled", [(n, tuple(b) * 2) for n, b in zip(MODERATION_CONCEPTS.names, blocks)])
    prompts = np.concatenate([np.concatenate([g, g]) for g in _ensembles(scorer.bank.embeddings)])
    image = model.encode_images(frames_with_red_fraction([1.0, 0.0]))
    assert np.allclose(concept_logits(image, prompts, doubled, model.logit_scale), scorer.bank.logits(image),
                       atol=1e-4)


def test_per_category_thresholds():
    scores = {"weapons": 0.4, "violence": 0.9, "gore_graphic": 0.1, "harassment": 0.25}
    node = {"weapons": 0.5}
    request = {"harassment": 0.2}
    limits = category_thresholds(0.3, node, request)
    assert set(limits) == set(CATEGORY_NAMES) and limits["violence"] == 0.3
    assert limits["weapons"] == 0.5 and limits["harassment"] == 0.2
    assert [v.category for v in violations(scores, limits)] == ["violence", "harassment"]
    assert category_thresholds(0.3, node, {"weapons": 0.35})["weapons"] == 0.35  # the request's wins


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
