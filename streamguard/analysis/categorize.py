"""Zero-shot categorization (CONTRACT §6) on the moderation engine
(scoring.concept_logits): each frame's distribution over the 20 content
categories is the softmax of their concept logits, and its tag distribution
the softmax over the tag vocabulary (tags.py). Frames are averaged.

`CategoryEvidence` is what any number of frames add up to (a segment, a whole
job: sums, so segments combine exactly as if all their frames had been
scored at once); `summarize_categorization` turns evidence into a result,
and the result into the per-segment record's shape (`record()`) or the
job/standalone shape of the reference (`summary()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference.clip import ClipModel
from ..schemas import CATEGORIZATION_NAMES, Categorization, CategorizationSummary, CategoryScore
from .scoring import ConceptSet, PromptBank, softmax
from .tags import TAG_TEMPLATE, TAGS
from .taxonomy import TOPICS

CATEGORIZATION_CONCEPTS = ConceptSet(
    "categorization", [(t.name, t.prompts) for t in TOPICS]
    + [(f"tag:{tag}", (TAG_TEMPLATE.format(tag),)) for tag in TAGS])

# Others than the primary are listed from this confidence up (the reference's 1%).
MIN_CONFIDENCE = 0.01
DEFAULT_TOP_K = 6
# Tags: the best-matching phrases by mean probability over the frames, at most
# MAX_TAGS, those from TAG_FLOOR up (the best one always).
MAX_TAGS = 5
TAG_FLOOR = 0.05


@dataclass
class CategoryEvidence:
    """Per-frame distributions summed over frames."""

    categories: np.ndarray  # [20]
    tags: np.ndarray  # [len(TAGS)]
    frames: int

    @classmethod
    def empty(cls) -> "CategoryEvidence":
        return cls(np.zeros(len(CATEGORIZATION_NAMES)), np.zeros(len(TAGS)), 0)

    @classmethod
    def of_frames(cls, categories: np.ndarray, tags: np.ndarray) -> "CategoryEvidence":
        """From per-frame distributions ([N, 20], [N, len(TAGS)])."""
        return cls(categories.sum(axis=0, dtype=np.float64), tags.sum(axis=0, dtype=np.float64), len(categories))

    def __add__(self, other: "CategoryEvidence") -> "CategoryEvidence":
        return CategoryEvidence(self.categories + other.categories, self.tags + other.tags,
                                self.frames + other.frames)


class Categorizer:
    """Category and tag distributions of image embeddings; the text side is
    encoded once per model and cached like the moderation prompts."""

    def __init__(self, model: ClipModel, cache_dir: Path) -> None:
        self.bank = PromptBank(model, cache_dir, CATEGORIZATION_CONCEPTS)

    def prepare(self) -> int:
        return self.bank.prepare()

    def frame_distributions(self, image_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, D] -> ([N, 20] category distributions, [N, len(TAGS)] tag distributions)."""
        logits = self.bank.logits(image_embeddings)
        n = len(TOPICS)
        return softmax(logits[:, :n], axis=1), softmax(logits[:, n:], axis=1)

    def evidence(self, image_embeddings: np.ndarray) -> CategoryEvidence:
        if len(image_embeddings) == 0:
            return CategoryEvidence.empty()
        return CategoryEvidence.of_frames(*self.frame_distributions(image_embeddings))


@dataclass(frozen=True)
class CategorizationResult:
    primary: str
    confidence: float
    categories: list[CategoryScore]
    tags: list[str]
    scores: dict[str, float]
    frames: int

    def record(self) -> Categorization:
        """The per-segment record's `categorization` (CONTRACT §3)."""
        return Categorization(primary_category=self.primary, confidence=self.confidence,
                              categories=self.categories, tags=self.tags, scores=self.scores)

    def summary(self, processing_time_ms: int) -> CategorizationSummary:
        """A job's or standalone input's categorization, in the reference's shape."""
        return CategorizationSummary(primaryCategory=self.primary, confidence=self.confidence,
                                     categories=self.categories, tags=self.tags, scores=self.scores,
                                     framesAnalyzed=self.frames, processingTimeMs=processing_time_ms)


def summarize_categorization(evidence: CategoryEvidence, top_k: int = DEFAULT_TOP_K) -> CategorizationResult | None:
    """The frames' mean distribution as a result: `scores` over all 20
    categories (summing to 1 up to rounding), `categories` the primary then
    the others with confidence >= 0.01, at most `top_k` entries, `tags` the
    best-matching phrases. None when no frame was analysed."""
    if evidence.frames <= 0:
        return None
    if not 1 <= top_k <= len(CATEGORIZATION_NAMES):
        raise ValueError(f"top_k must be between 1 and {len(CATEGORIZATION_NAMES)}")
    mean = evidence.categories / evidence.frames
    rounded = [round(float(v), 4) for v in mean]
    order = sorted(range(len(rounded)), key=lambda i: (-mean[i], i))  # ties: the contract's order
    primary = order[0]
    listed = [primary] + [i for i in order[1:] if rounded[i] >= MIN_CONFIDENCE][:top_k - 1]
    categories = [CategoryScore(name=CATEGORIZATION_NAMES[i], confidence=rounded[i], primary=i == primary)
                  for i in listed]
    tag_mean = evidence.tags / evidence.frames
    tag_order = np.argsort(-tag_mean, kind="stable")
    tags = [TAGS[i] for n, i in enumerate(tag_order[:MAX_TAGS]) if n == 0 or tag_mean[i] >= TAG_FLOOR]
    return CategorizationResult(primary=CATEGORIZATION_NAMES[primary], confidence=rounded[primary],
                                categories=categories, tags=tags,
                                scores=dict(zip(CATEGORIZATION_NAMES, rounded)), frames=evidence.frames)
