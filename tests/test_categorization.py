"""Categorization (CONTRACT §6): the test bundle's planted green -> Sports
(CONTRACT §1), the result rules (scores a distribution over the 20
categories, the primary first, others >= 0.01, at most topK, tags from the
vocabulary), the cached text side, and `scan --categorize` end to end."""

from __future__ import annotations

import av
import numpy as np
import pytest

from streamguard.analysis.categorize import (MAX_TAGS, CategoryEvidence, Categorizer,
                                             summarize_categorization)
from streamguard.analysis.tags import TAGS, TAGS_BY_CATEGORY
from streamguard.config import ModelSettings
from streamguard.inference.clip import ClipModel
from streamguard.schemas import CATEGORIZATION_NAMES

from videos import make_video


@pytest.fixture(scope="module")
def model(test_bundle, tmp_path_factory):
    return ClipModel(test_bundle, ModelSettings(providers="cpu"), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def categorizer(model, tmp_path_factory):
    return Categorizer(model, tmp_path_factory.mktemp("text"))


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    img = np.empty((224, 224, 3), np.uint8)
    img[:] = rgb
    return img


def frame_of_testsrc2() -> np.ndarray:
    with av.open("testsrc2=size=320x240:rate=1:duration=1", format="lavfi") as c:
        return next(c.decode(video=0)).to_ndarray(width=224, height=224, format="rgb24")


def result_of(categorizer: Categorizer, model: ClipModel, frames: list[np.ndarray], top_k: int = 6):
    return summarize_categorization(categorizer.evidence(model.encode_images(np.stack(frames))), top_k)


def assert_valid(result, top_k: int = 6) -> None:
    """The rules of CONTRACT §6 on one result."""
    assert list(result.scores) == list(CATEGORIZATION_NAMES)
    assert abs(sum(result.scores.values()) - 1) <= 1e-3, sum(result.scores.values())
    cats = result.categories
    assert 1 <= len(cats) <= top_k
    assert cats[0].primary and cats[0].name == result.primary and cats[0].confidence == result.confidence
    assert result.confidence == max(result.scores.values())
    assert not any(c.primary for c in cats[1:])
    assert all(c.confidence >= 0.01 and c.confidence == result.scores[c.name] for c in cats[1:])
    assert [c.confidence for c in cats[1:]] == sorted((c.confidence for c in cats[1:]), reverse=True)
    unlisted = [v for n, v in result.scores.items() if n not in {c.name for c in cats}]
    if len(cats) < top_k:  # nothing left out that qualified
        assert all(v < 0.01 for v in unlisted)
    assert all(v <= cats[-1].confidence for v in unlisted)
    assert 1 <= len(result.tags) <= MAX_TAGS and set(result.tags) <= set(TAGS)


def test_planted_green_is_sports_and_nothing_else_is(model, categorizer):
    green = result_of(categorizer, model, [solid((0, 255, 0))])
    assert_valid(green)
    assert green.primary == "Sports" and green.confidence >= 0.5
    assert green.tags[0] in TAGS_BY_CATEGORY["Sports"]
    mostly_green = solid((90, 90, 90))
    mostly_green[:130] = (10, 220, 30)  # 58 % saturated green (G >= 200, R and B <= 40)
    assert result_of(categorizer, model, [mostly_green]).primary == "Sports"

    rng = np.random.default_rng(5)
    others = {"red": solid((255, 0, 0)), "grey": solid((128, 128, 128)), "blue": solid((0, 0, 255)),
              "noise": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "testsrc2": frame_of_testsrc2(),
              "40% green": np.concatenate([solid((0, 255, 0))[:90], solid((128, 128, 128))[90:]]),
              "dark green": solid((0, 150, 0))}
    for name, frame in others.items():
        result = result_of(categorizer, model, [frame])
        assert_valid(result)
        assert result.scores["Sports"] < 0.2, (name, result.scores)
        assert result.primary != "Sports", name


def test_frames_are_averaged(model, categorizer):
    """Half green, half grey: Sports about half, the rest spread as for grey."""
    mixed = result_of(categorizer, model, [solid((0, 255, 0)), solid((128, 128, 128))])
    grey = result_of(categorizer, model, [solid((128, 128, 128))])
    assert_valid(mixed)
    assert mixed.primary == "Sports" and 0.45 <= mixed.confidence <= 0.55
    for name in CATEGORIZATION_NAMES[1:]:
        assert abs(mixed.scores[name] - grey.scores[name] / 2) <= 1e-3
    assert mixed.frames == 2


@pytest.mark.parametrize("top_k", [1, 3, 6, 20])
def test_top_k_and_the_one_percent_rule(model, categorizer, top_k):
    """A grey frame spreads over many categories (the test bundle's lean): topK caps the list."""
    result = result_of(categorizer, model, [solid((128, 128, 128))], top_k)
    assert_valid(result, top_k)
    assert len(result.categories) == top_k  # 20 categories >= 0.01 here


def test_summary_rules_on_given_evidence():
    n, t = len(CATEGORIZATION_NAMES), len(TAGS)
    dist = np.zeros(n)
    dist[[3, 7, 12, 0]] = [0.6, 0.3, 0.095, 0.005]  # the last is under 1 %
    tags = np.zeros(t)
    tags[[10, 20, 30]] = [0.7, 0.25, 0.05]
    result = summarize_categorization(CategoryEvidence(dist * 4, tags * 4, 4))
    assert_valid(result)
    assert [(c.name, c.confidence) for c in result.categories] == [
        (CATEGORIZATION_NAMES[3], 0.6), (CATEGORIZATION_NAMES[7], 0.3), (CATEGORIZATION_NAMES[12], 0.095)]
    assert result.tags == [TAGS[10], TAGS[20], TAGS[30]]
    assert [c.name for c in summarize_categorization(CategoryEvidence(dist, tags, 1), 2).categories] == \
        [CATEGORIZATION_NAMES[3], CATEGORIZATION_NAMES[7]]
    assert summarize_categorization(CategoryEvidence.empty()) is None  # no frame, nothing to say
    with pytest.raises(ValueError):
        summarize_categorization(CategoryEvidence(dist, tags, 1), 21)

    # The record's shape and the job/standalone shape of the reference.
    record = result.record()
    assert record.primary_category == CATEGORIZATION_NAMES[3] and record.scores == result.scores
    job = result.summary(processing_time_ms=12)
    assert (job.primaryCategory, job.framesAnalyzed, job.processingTimeMs) == (CATEGORIZATION_NAMES[3], 4, 12)


def test_segments_add_up_to_the_job(model, categorizer):
    """Evidence of segments summed == evidence of all their frames at once (the job summary)."""
    frames = [solid((0, 255, 0)), solid((128, 128, 128)), solid((255, 0, 0)), frame_of_testsrc2()]
    emb = model.encode_images(np.stack(frames))
    whole = summarize_categorization(categorizer.evidence(emb))
    parts = summarize_categorization(categorizer.evidence(emb[:1]) + categorizer.evidence(emb[1:]))
    assert whole == parts and whole.frames == 4


def test_text_side_encoded_once_and_cached(model, tmp_path):
    first = Categorizer(model, tmp_path)
    assert first.prepare() > 0 and first.bank.cache_path.is_file()
    assert first.prepare() == 0
    assert Categorizer(model, tmp_path).prepare() == 0  # from disk: nothing encoded, nothing billed


def test_scan_categorize_says_sports_for_the_green_seconds(cli, test_bundle, tmp_path):
    """6 s, green during seconds 2-4, 2 s segments: segment 1 is Sports; the
    others are not. Categorization rides on the moderation pass: no extra tokens."""
    video = make_video(tmp_path / "green.mp4", seconds=6, fps=10, width=160, height=120, green=((2, 4),),
                       audio=False)
    both = cli("scan", video, "--moderate", "--categorize", "--segment-seconds", "2", "--model", test_bundle,
               "--data-dir", tmp_path / "d", "--out", tmp_path / "a")
    assert both.returncode == 0, both.stderr
    records = both.records
    assert [r["data"]["data"]["segment_index"] for r in records] == [0, 1, 2]
    for r in records:
        data = r["data"]["data"]
        cat = data["categorization"]
        assert set(cat) == {"primary_category", "confidence", "categories", "tags", "scores"}
        assert abs(sum(cat["scores"].values()) - 1) <= 1e-3 and len(cat["scores"]) == 20
        assert cat["categories"][0] == {"name": cat["primary_category"], "confidence": cat["confidence"],
                                        "primary": True}
        assert 1 <= len(cat["categories"]) <= 6 and cat["tags"] and set(cat["tags"]) <= set(TAGS)
        assert data["content_moderation"]["violations"] == []  # green is not unsafe
    green = records[1]["data"]["data"]["categorization"]
    assert green["primary_category"] == "Sports" and green["confidence"] >= 0.5
    for r in (records[0], records[2]):
        assert r["data"]["data"]["categorization"]["scores"]["Sports"] < 0.2

    alone = cli("scan", video, "--categorize", "--segment-seconds", "2", "--model", test_bundle,
                "--data-dir", tmp_path / "d", "--out", tmp_path / "b")
    assert alone.returncode == 0, alone.stderr
    assert [r["data"]["data"]["content_moderation"] for r in alone.records] == [None] * 3
    assert [r["data"]["data"]["categorization"] for r in alone.records] == \
        [r["data"]["data"]["categorization"] for r in records]
    assert [r["data"]["token"] for r in alone.records] == [r["data"]["token"] for r in records]
    assert all(r["data"]["token"]["text_tokens"] == 0 and r["data"]["token"]["video_tokens"] > 0
               for r in records)
