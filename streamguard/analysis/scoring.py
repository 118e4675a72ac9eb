"""Zero-shot moderation scores from CLIP embeddings.

How a score is computed (per frame, per category c):

    l_c   = s * cos(image, mean-of-prompt-embeddings(c))       (s = logit scale, 100 for CLIP)
    l_k   = s * cos(image, safe prompt k)                      for each safe prompt k
    score = exp(l_c) / (exp(l_c) + sum_k exp(l_k)) = sigmoid(l_c - logsumexp_k(l_k))

That is CLIP's own zero-shot softmax, restricted to "this category versus
every ordinary scene". Why this calibration:
- Each category is judged only against the safe contrast set, not against
  the other 12 categories, so adding a category never dilutes another's
  score, and an image that is both violent and gory scores high on both.
- The contrast set keeps CLIP's temperature meaningful: a frame of people
  talking matches a safe prompt far better than any category, so every score
  stays near 0, while a frame closer to a category than to *all* everyday
  scenes climbs towards 1. A threshold of 0.30 (the reference default) then
  means "at least ~30% as likely as all safe interpretations put together".
- The prompt ensemble (mean of normalised prompt embeddings, renormalised) is
  the CLIP paper's prompt-ensembling and steadies scores across phrasings.

A segment's score per category is the max over its sampled frames; a
violation is a category whose score reaches the threshold.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from ..inference.clip import ClipModel, l2_normalize
from ..schemas import Violation
from .categories import CATEGORY_NAMES, MODERATION_CATEGORIES, SAFE_PROMPTS, SEVERITY


class PromptEmbeddings:
    """Category (ensembled) and safe-prompt embeddings for one model."""

    def __init__(self, categories: np.ndarray, safe: np.ndarray) -> None:
        self.categories = categories  # [C, D]
        self.safe = safe  # [S, D]


def _prompt_key(fingerprint: str) -> str:
    payload = json.dumps([[c.name, c.prompts] for c in MODERATION_CATEGORIES] + [SAFE_PROMPTS])
    return f"{fingerprint}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


class ModerationScorer:
    """Turns image embeddings into per-category scores. Prompt embeddings are
    computed once per model + prompt set and cached on disk; `prepare()`
    reports how many prompt tokens it had to encode (0 when cached), which is
    what the segment that triggered it is charged as text tokens."""

    def __init__(self, model: ClipModel, cache_dir: Path) -> None:
        self.model = model
        self.cache_path = Path(cache_dir) / "text" / f"{_prompt_key(model.fingerprint)}.npz"
        self._prompts: PromptEmbeddings | None = None
        self._lock = threading.Lock()

    def prepare(self) -> int:
        if self._prompts is not None:
            return 0
        with self._lock:
            if self._prompts is not None:
                return 0
            tokens = 0
            if self.cache_path.is_file():
                data = np.load(self.cache_path)
                cats, safe = data["categories"], data["safe"]
            else:
                cats, safe, tokens = self._encode()
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_path.with_suffix(".tmp.npz")
                np.savez(tmp, categories=cats, safe=safe)
                tmp.replace(self.cache_path)
            self._prompts = PromptEmbeddings(cats, safe)
            return tokens

    def _encode(self) -> tuple[np.ndarray, np.ndarray, int]:
        texts = [p for c in MODERATION_CATEGORIES for p in c.prompts]
        emb, tokens = self.model.encode_texts(texts + list(SAFE_PROMPTS))
        cats, start = [], 0
        for c in MODERATION_CATEGORIES:
            cats.append(emb[start:start + len(c.prompts)].mean(axis=0))
            start += len(c.prompts)
        return l2_normalize(np.stack(cats)), emb[start:], tokens

    def score(self, image_embeddings: np.ndarray) -> np.ndarray:
        """[N, D] normalised image embeddings -> [N, C] scores in [0, 1]."""
        self.prepare()
        assert self._prompts is not None
        s = self.model.logit_scale
        cat = s * image_embeddings @ self._prompts.categories.T
        safe = s * image_embeddings @ self._prompts.safe.T
        safe_max = safe.max(axis=1, keepdims=True)
        lse = safe_max + np.log(np.exp(safe - safe_max).sum(axis=1, keepdims=True))
        return 0.5 * (1.0 + np.tanh(0.5 * (cat - lse)))  # sigmoid, without exp overflow


def violations(scores: dict[str, float], threshold: float) -> list[Violation]:
    """Categories at or above threshold, highest first (the reference's shape)."""
    hits = sorted(((n, v) for n, v in scores.items() if v >= threshold), key=lambda kv: -kv[1])
    return [Violation(category=n, confidence=v, severity=SEVERITY[n]) for n, v in hits]


def scores_dict(row: np.ndarray) -> dict[str, float]:
    return {name: round(float(v), 4) for name, v in zip(CATEGORY_NAMES, row)}
