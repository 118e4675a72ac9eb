"""Zero-shot scores from CLIP embeddings: one engine for moderation and
categorization, in which every concept is treated alike.

A concept (a moderation category, an everyday "safe" scene, a content
category, a tag) is an ensemble of n prompts p_1..p_n. Per frame:

    l_i = s * cos(image, p_i)                  (s = logit scale, 100 for CLIP)
    L   = logsumexp_i(l_i) - log n             (the concept's logit)

exp(L) is the mean of exp(l_i): the concept is a mixture of its phrasings,
each with an equal share of the concept's prior, and every concept has the
same prior. That is CLIP's own zero-shot softmax over prompts, with prompts
grouped into concepts, and it has no term that depends on how spread out a
concept's phrasings are. (The previous engine averaged a category's prompt
embeddings and renormalised the mean: that multiplies the category's cosine
by 1/|mean|, several logits at s = 100, a different amount per category,
while each safe prompt stood alone; so a score meant more for one category
than another.) A one-prompt concept's logit is plain CLIP's.

Moderation, per category c, against the safe concepts k:

    score_c = exp(L_c) / (exp(L_c) + sum_k exp(L_k)) = sigmoid(L_c - logsumexp_k L_k)

Each category is judged only against the contrast set of everyday scenes, so
categories never dilute each other, and an image that is both violent and
gory scores high on both. score_c is the probability CLIP's softmax gives the
category when the only alternatives are the everyday scenes, with the
category and every scene on an equal footing. The odds score/(1-score) are
exp(L_c) over the summed exp(L_k): at the default threshold 0.30 the category
explains the frame at least 0.43 times as well as all everyday scenes
together (its logit at most 0.85 below their logsumexp, so at most 0.85, or
0.0085 cosine at s = 100, below the best-matching scene); the same statement
for every category, which is why one
threshold (or a per-category one, config `pipeline.thresholds`) means the
same thing everywhere. A segment's score is the max over its sampled frames;
a violation is a category whose score reaches its threshold.

Categorization (categorize.py) is the softmax of the same concept logits
over the 20 content categories; tags, the softmax over the tag vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..inference.clip import ClipModel
from ..schemas import Violation
from .categories import CATEGORY_NAMES, MODERATION_CATEGORIES, SAFE_CONCEPTS, SEVERITY


class ConceptSet:
    """Named concepts, each an ensemble of prompts, embedded together once per
    model (`PromptBank`)."""

    def __init__(self, name: str, concepts: Sequence[tuple[str, tuple[str, ...]]]) -> None:
        self.name = name
        self.names = tuple(n for n, _ in concepts)
        self.prompts = [p for _, prompts in concepts for p in prompts]
        sizes = np.array([len(prompts) for _, prompts in concepts], np.int64)
        if (sizes < 1).any():
            raise ValueError(f"{name}: every concept needs at least one prompt")
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.log_sizes = np.log(sizes).astype(np.float32)

    def split(self, rows: np.ndarray) -> list[np.ndarray]:
        """Per-prompt rows ([P, ...], in `prompts` order) cut into one block per concept."""
        return np.split(rows, self.starts[1:])

    def key(self, fingerprint: str) -> str:
        payload = json.dumps([ENGINE_VERSION, self.name, self.names, self.prompts])
        return f"{fingerprint}-{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


# Bumped when what a cache file holds changes meaning.
ENGINE_VERSION = 2


def concept_logits(image_embeddings: np.ndarray, prompts: np.ndarray, concepts: ConceptSet,
                   scale: float) -> np.ndarray:
    """[N, D] normalised image embeddings, [P, D] normalised prompt embeddings
    -> [N, K] concept logits (logsumexp over each concept's prompts - log n)."""
    logits = scale * (image_embeddings @ prompts.T)  # [N, P]
    peak = np.maximum.reduceat(logits, concepts.starts, axis=1)  # [N, K]
    expanded = np.repeat(peak, concepts.sizes, axis=1)
    sums = np.add.reduceat(np.exp(logits - expanded), concepts.starts, axis=1)
    return peak + np.log(sums) - concepts.log_sizes


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    out = peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class PromptBank:
    """The prompt embeddings of one ConceptSet for one model: encoded once and
    cached on disk (keyed by the model's fingerprint and the prompts).
    `prepare()` returns the prompt tokens it had to encode (0 when cached):
    the node's own cost, charged to no request (analyzer.TextTokenMeter)."""

    def __init__(self, model: ClipModel, cache_dir: Path, concepts: ConceptSet) -> None:
        self.model = model
        self.concepts = concepts
        self.cache_path = Path(cache_dir) / "text" / f"{concepts.key(model.fingerprint)}.npz"
        self._prompts: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def embeddings(self) -> np.ndarray:
        """[P, D] normalised prompt embeddings, in ConceptSet.prompts order."""
        self.prepare()
        assert self._prompts is not None
        return self._prompts

    def prepare(self) -> int:
        if self._prompts is not None:
            return 0
        with self._lock:
            if self._prompts is not None:
                return 0
            tokens = 0
            if self.cache_path.is_file():
                prompts = np.load(self.cache_path)["prompts"]
            else:
                prompts, tokens = self.model.encode_texts(self.concepts.prompts)
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_path.with_suffix(".tmp.npz")
                np.savez(tmp, prompts=prompts)
                tmp.replace(self.cache_path)
            self._prompts = prompts
            return tokens

    def logits(self, image_embeddings: np.ndarray) -> np.ndarray:
        """[N, D] -> [N, K] concept logits."""
        return concept_logits(image_embeddings, self.embeddings, self.concepts, self.model.logit_scale)


MODERATION_CONCEPTS = ConceptSet(
    "moderation", [(c.name, c.prompts) for c in MODERATION_CATEGORIES]
    + [(f"safe:{c.name}", c.prompts) for c in SAFE_CONCEPTS])


class ModerationScorer:
    """Turns image embeddings into per-category moderation scores."""

    def __init__(self, model: ClipModel, cache_dir: Path) -> None:
        self.model = model
        self.bank = PromptBank(model, cache_dir, MODERATION_CONCEPTS)
        self.cache_path = self.bank.cache_path

    def prepare(self) -> int:
        return self.bank.prepare()

    def score(self, image_embeddings: np.ndarray) -> np.ndarray:
        """[N, D] normalised image embeddings -> [N, C] scores in [0, 1]."""
        logits = self.bank.logits(image_embeddings)
        n = len(MODERATION_CATEGORIES)
        margin = logits[:, :n] - logsumexp(logits[:, n:], axis=1, keepdims=True)
        return 0.5 * (1.0 + np.tanh(0.5 * margin))  # sigmoid, without exp overflow


def category_thresholds(default: float, *maps: Mapping[str, float] | None) -> dict[str, float]:
    """Every moderation category's threshold: `default`, replaced per category
    by each map in turn (the node's config map, then a request's own)."""
    out = {name: default for name in CATEGORY_NAMES}
    for m in maps:
        out.update(m or {})
    return out


def violations(scores: dict[str, float], threshold: float | Mapping[str, float]) -> list[Violation]:
    """Categories at or above their threshold (one for all, or per category),
    highest first (the reference's shape)."""
    limit = (lambda n: threshold[n]) if isinstance(threshold, Mapping) else (lambda n: threshold)
    hits = sorted(((n, v) for n, v in scores.items() if v >= limit(n)), key=lambda kv: -kv[1])
    return [Violation(category=n, confidence=v, severity=SEVERITY[n]) for n, v in hits]


def scores_dict(row: np.ndarray) -> dict[str, float]:
    return {name: round(float(v), 4) for name, v in zip(CATEGORY_NAMES, row)}
