"""The AI side shared by all pipelines of a process: one model, one batcher,
one moderation scorer and one categorizer. Turns a closed segment's sampled
frames into the analysis parts of its record: each frame is run through the
image encoder once, whatever analyses use its embedding."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import CancelledError, Future
from fractions import Fraction
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..config import LogoSettings, Settings
from ..errors import ModelError
from ..inference.batcher import InferenceBatcher
from ..inference.clip import ClipModel
from ..media.segmenter import fmt_time
from .categories import CATEGORY_NAMES
from .categorize import CategoryEvidence, Categorizer
from .logos import BackgroundSet, FrameHit, FrameProbe, Gallery, GalleryLogo, LogoDetector, keep_views, reference_views
from .reuse import StreamReuse
from .scoring import ModerationScorer, scores_dict, violations
from ..schemas import ContentModeration, FlaggedFrame

log = logging.getLogger(__name__)


async def gather_threadsafe(futures: list[Future]) -> list:
    """Results of futures completed on other threads, with one event-loop
    wakeup when the last is done instead of one per future (a segment's
    frames finish in a burst; each wakeup is a thread switch on a busy core).
    A cancelled future raises concurrent.futures.CancelledError here."""
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    remaining = len(futures)
    lock = threading.Lock()

    def wake() -> None:
        if not all_done.done():
            all_done.set_result(None)

    def on_done(_: Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop is gone; nobody is waiting
                pass

    if futures:
        for fut in futures:
            fut.add_done_callback(on_done)
        await all_done
    return [fut.result() for fut in futures]


def resolve_model_dir(settings: Settings, override: str | None = None) -> Path:
    path = override or settings.model.path
    return Path(path) if path else settings.data_dir / "models" / "default"


class TextTokenMeter:
    """Text tokens encoded for one request (its own prompts or names), charged
    to that request's next record. The node's shared prompt embeddings (encoded
    at start or for the cache) never count here: they serve every tenant, so
    charging them to whichever segment comes first would bill one tenant for
    the node's own work."""

    def __init__(self) -> None:
        self._pending = 0
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._pending += tokens

    def take(self) -> int:
        with self._lock:
            tokens, self._pending = self._pending, 0
            return tokens


class Analyzer:
    def __init__(self, model: ClipModel, batcher: InferenceBatcher, scorer: ModerationScorer,
                 categorizer: Categorizer, *, reuse_duplicates: bool = True,
                 logos: LogoSettings | None = None, cache_dir: Path | None = None,
                 on_regions: Callable[[int, int], None] | None = None) -> None:
        self.model = model
        self.batcher = batcher
        self.scorer = scorer
        self.categorizer = categorizer
        self.reuse_duplicates = reuse_duplicates
        self.logos = LogoDetector(self.submit, model.image_size, logos or LogoSettings(), on_regions)
        self.backgrounds = BackgroundSet(model.fingerprint, cache_dir or Path("."), model.image_size)

    @classmethod
    def create(cls, settings: Settings, model_dir: Path,
               on_batch: Callable[[int, float], None] | None = None,
               on_regions: Callable[[int, int], None] | None = None) -> "Analyzer":
        cache = settings.data_dir / "cache"
        inf = settings.inference
        model = ClipModel(model_dir, settings.model, cache, max_batch=inf.max_batch)
        if model.manifest.shape_real:  # said where serve and scan load it, not by tools that convert it
            log.warning("model bundle %s (%s) has random weights: it is not a model, its scores mean "
                        "nothing (only for measuring inference cost)", model_dir, model.manifest.name)
        if inf.io_binding:
            model.use_io_binding()
        # The batcher's collector normalises the next batch while the encoder runs this one.
        batcher = InferenceBatcher(model.encode_prepared, prepare=model.preprocess, max_batch=inf.max_batch,
                                   max_wait=inf.max_wait_ms / 1000, budget=inf.batch_budget_ms / 1000,
                                   on_batch=on_batch)
        return cls(model, batcher, ModerationScorer(model, cache), Categorizer(model, cache),
                   reuse_duplicates=inf.reuse_duplicates, logos=settings.logos, cache_dir=cache,
                   on_regions=on_regions)

    def prepare(self) -> int:
        """Encode (or load cached) the shared prompt embeddings of moderation,
        categories and tags; blocking, call off-loop. Returns the prompt tokens
        encoded: the node's own cost, charged to no request."""
        return self.scorer.prepare() + self.categorizer.prepare()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.model.tokens_per_image

    def submit(self, crop: np.ndarray) -> Future:
        return self.batcher.submit(crop)

    def stream_reuse(self) -> StreamReuse:
        """A new stream's duplicate-frame reuse (one per pipeline: never across tasks)."""
        return StreamReuse(self.submit, enabled=self.reuse_duplicates)

    async def embeddings(self, frames: list[tuple[Fraction, Future]]) -> np.ndarray:
        """The frames' image embeddings [N, D], once the batcher has them."""
        if not frames:
            return np.zeros((0, self.model.manifest.embedding_dim), np.float32)
        try:
            return np.stack(await gather_threadsafe([f for _, f in frames]))
        except CancelledError:
            raise ModelError("frames withdrawn: the task ended") from None
        except Exception as exc:
            raise ModelError(f"inference failed: {exc}") from None

    def moderation(self, frames: list[tuple[Fraction, Future]], embeddings: np.ndarray,
                   threshold: float | Mapping[str, float]) -> ContentModeration:
        """Moderation of a segment's frames from their embeddings; `threshold`
        is one for every category or one per category (scoring.category_thresholds)."""
        if not frames:
            return ContentModeration(has_unsafe_content=False, frames_processed=0, violations=[],
                                     scores=scores_dict(np.zeros(len(CATEGORY_NAMES))),
                                     flagged_frames=[])
        per_frame = self.scorer.score(embeddings)
        segment_scores = scores_dict(per_frame.max(axis=0))
        flagged = []
        for i, ((t, _), row) in enumerate(zip(frames, per_frame)):
            hits = violations(scores_dict(row), threshold)
            if hits:
                flagged.append(FlaggedFrame(frame_index=i, time=fmt_time(t), violations=hits))
        seg_violations = violations(segment_scores, threshold)
        return ContentModeration(has_unsafe_content=bool(seg_violations), frames_processed=len(frames),
                                 violations=seg_violations, scores=segment_scores, flagged_frames=flagged)

    async def moderate(self, frames: list[tuple[Fraction, Future]],
                       threshold: float | Mapping[str, float]) -> ContentModeration:
        return self.moderation(frames, await self.embeddings(frames), threshold)

    def category_evidence(self, embeddings: np.ndarray) -> CategoryEvidence:
        """Categorization evidence of frames (categorize.summarize_categorization
        turns it, or the sum of many, into a result)."""
        return self.categorizer.evidence(embeddings)

    # --- logos ------------------------------------------------------------------------

    def _encode_now(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings of crops through the shared batcher, waiting (off the loop)."""
        futures = [self.submit(c) for c in crops]
        return np.stack([f.result() for f in futures])

    def background_embeddings(self) -> np.ndarray:
        """The logo scorer's background set for this model (blocking the
        first time: encoded, then cached on disk)."""
        return self.backgrounds.get(self._encode_now)

    def reference_embeddings(self, image) -> np.ndarray:
        """A gallery reference image's embeddings [views, D]: its augmented
        views (logos.reference_views), those that still look like it kept.
        Blocking: call off the loop."""
        emb = self._encode_now(np.stack(reference_views(image, self.image_size)))
        return keep_views(emb, self.background_embeddings())

    def gallery(self, logos: list[GalleryLogo]) -> Gallery:
        """A gallery to score regions with (blocking the first time: the background set)."""
        return Gallery(logos, self.background_embeddings(), self.model.logit_scale)

    async def detect_logos(self, probes: list[FrameProbe], gallery: Gallery) -> list[list[FrameHit]]:
        """Per probe, the logos its frame shows (the refine pass runs here)."""
        try:
            return await self.logos.detect(probes, gallery, gather_threadsafe)
        except CancelledError:
            raise ModelError("frames withdrawn: the task ended") from None
        except Exception as exc:
            raise ModelError(f"logo detection failed: {exc}") from None

    def close(self) -> None:
        self.batcher.close()

