"""Standalone, synchronous moderation and categorization (CONTRACT §2, issue
11): fetch an image or a video by URL (or take an upload), decode it off the
event loop into crops made exactly like stream frames (media/stills.py), run
them through the shared batcher with everything else, and reply with the
completed job."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..analysis.analyzer import Analyzer
from ..analysis.categorize import summarize_categorization
from ..analysis.scoring import category_thresholds
from ..config import Settings
from ..delivery.worker import DeliveryWorker, envelope, new_event_id, outbox_items
from ..errors import InsufficientBalance, NotFound, StreamGuardError, Unavailable
from ..inputs.fetch import FetchLimits, download, fetch_bytes
from ..media.stills import image_crops, video_crops
from ..schemas import (CategorizationJob, CategorizeRequest, ModerationBatchItem, ModerationJob,
                       StandaloneFlaggedFrame, StandaloneJobQuery, _Moderate)
from ..store.sqlite import AsyncStore, InsufficientBalance as StoreInsufficientBalance, Principal, Store

import msgspec

Job = ModerationJob | CategorizationJob
KIND_EVENT = {"moderation": "moderation", "categorization": "categorization"}

MAX_IMAGE_BYTES = 20 << 20  # the contract's upload limit, and the fetch limit for an image
MAX_VIDEO_BYTES = 2 << 30
FETCH_TIMEOUT_S = 60.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(t0: float) -> int:
    return round((time.monotonic() - t0) * 1000)


class Verdict:
    """One input's moderation: the analyser's result in the reference's words."""

    def __init__(self, safe: bool, violations: list, scores: dict[str, float],
                 flagged: list[StandaloneFlaggedFrame], frames: int) -> None:
        self.safe, self.violations, self.scores, self.flagged, self.frames = safe, violations, scores, flagged, frames


def _save(store: Store, principal: Principal, kind: str, job: Job, event: str, cost: int) -> None:
    """Runs on the store thread: the job, its charge and its event (to the project webhook) at once."""
    body = msgspec.json.encode(job)
    project = store.project(principal.project_id)
    outbox = []
    if project is not None:
        data = msgspec.to_builtins(job)
        data["jobId"] = job.id
        event_id = new_event_id()
        outbox = outbox_items(project, None, None, event,
                              envelope(event, event_id, project.id, job.metadata, data), event_id)
    store.save_standalone_job(job.id, principal.project_id, principal.key_id, kind, job.status, body, cost, outbox)


class StandaloneService:
    def __init__(self, settings: Settings, analyzer: Analyzer | None, store: AsyncStore,
                 delivery: DeliveryWorker | None = None) -> None:
        self.settings = settings
        self.analyzer = analyzer
        self.store = store
        self.delivery = delivery

    # --- stored jobs and their events -----------------------------------------------------

    async def run(self, principal: Principal, kind: str, job: Job, work) -> Job:
        """`work` (an awaitable filling `job`) between the started and the
        completed/failed events; the job's tokens are charged with its result
        (402 when the key cannot pay; the job is then FAILED)."""
        try:
            self._model()
            balance = await self.store(Store.balance, principal.key_id)
            if balance is not None and balance <= 0:
                raise InsufficientBalance("the API key has no token balance left", details={"balance": balance})
            await self.store(_save, principal, kind, job, f"{kind}.started", 0)
        except BaseException:
            work.close()
            raise
        try:
            try:
                await work
            except StreamGuardError as exc:
                await self._fail(principal, kind, job, str(exc))
                raise
            try:
                await self.store(_save, principal, kind, job, f"{kind}.completed" if job.status == "COMPLETED"
                                 else f"{kind}.failed", job.tokens)
            except StoreInsufficientBalance:
                cost = job.tokens
                job.tokens = 0
                await self._fail(principal, kind, job, f"insufficient balance to pay this job ({cost} tokens)")
                raise InsufficientBalance(f"the API key cannot pay this job ({cost} tokens)",
                                          details={"tokens": cost}) from None
        finally:
            if self.delivery is not None:
                self.delivery.wake()
        return job

    async def _fail(self, principal: Principal, kind: str, job: Job, message: str) -> None:
        job.status, job.errorMessage, job.completedAt = "FAILED", message, now_iso()
        await self.store(_save, principal, kind, job, f"{kind}.failed", 0)

    async def get(self, principal: Principal, kind: str, job_id: str) -> msgspec.Raw:
        body = await self.store(Store.standalone_job, job_id, principal.project_id, kind)
        if body is None:
            raise NotFound(f"no {kind} job {job_id}")
        return msgspec.Raw(body)

    async def list(self, principal: Principal, kind: str, query: StandaloneJobQuery) -> tuple[list[msgspec.Raw], int]:
        status = query.status or None
        bodies, total = await self.store(Store.list_standalone_jobs, principal.project_id, kind, status,
                                         query.page, query.pageSize)
        return [msgspec.Raw(b) for b in bodies], total

    # --- the model -------------------------------------------------------------------------

    def _model(self) -> Analyzer:
        if self.analyzer is None:
            raise Unavailable("moderation and categorization are unavailable on this node: no model loaded",
                              details={"reason": "model_not_loaded"})
        return self.analyzer

    async def _embeddings(self, crops: list[np.ndarray]) -> tuple[list, np.ndarray]:
        analyzer = self._model()
        frames = [(Fraction(0), analyzer.submit(c)) for c in crops]
        return frames, await analyzer.embeddings(frames)

    async def _verdict(self, crops: list[np.ndarray], thresholds: Mapping[str, float]) -> Verdict:
        analyzer = self._model()
        frames, emb = await self._embeddings(crops)
        m = analyzer.moderation(frames, emb, thresholds)
        flagged = [StandaloneFlaggedFrame(frameIndex=f.frame_index, violations=f.violations)
                   for f in m.flagged_frames]
        return Verdict(not m.has_unsafe_content, m.violations, m.scores, flagged, m.frames_processed)

    def thresholds(self, req: _Moderate) -> dict[str, float]:
        return category_thresholds(req.threshold, self.settings.pipeline.thresholds, req.thresholds)

    # --- inputs ----------------------------------------------------------------------------

    async def image_from_url(self, url: str, max_frames: int, field: str = "inputUrl") -> list[np.ndarray]:
        data = await fetch_bytes(url, sources=self.settings.sources,
                                 limits=FetchLimits(max_bytes=MAX_IMAGE_BYTES, timeout=FETCH_TIMEOUT_S),
                                 field=field)
        return await self.image_from_bytes(data, max_frames, field)

    async def image_from_bytes(self, data: bytes, max_frames: int, field: str) -> list[np.ndarray]:
        size = self._model().image_size
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: image_crops(data, size, max_frames=max_frames, max_pixels=self.settings.limits.max_image_pixels,
                                     field=field))

    async def video_from_url(self, url: str, max_frames: int) -> list[np.ndarray]:
        size = self._model().image_size
        with tempfile.TemporaryDirectory(prefix="standalone-", dir=self.settings.data_dir) as tmp:
            path = Path(tmp) / "input"
            await download(url, path, sources=self.settings.sources,
                           limits=FetchLimits(max_bytes=MAX_VIDEO_BYTES, timeout=FETCH_TIMEOUT_S * 5))
            found = await asyncio.get_running_loop().run_in_executor(
                None, lambda: video_crops(path, size, max_frames=max_frames))
        return [c for _, c in found]

    # --- jobs ------------------------------------------------------------------------------

    def _job(self, input_url: str | None, input_type: str, metadata: dict[str, Any] | None) -> ModerationJob:
        return ModerationJob(id=uuid.uuid4().hex, status="PROCESSING", inputUrl=input_url, inputType=input_type,
                             safe=None, violations=[], scores={}, flaggedFrames=[], framesAnalyzed=0,
                             processingTimeMs=0, createdAt=now_iso(), completedAt=None, metadata=metadata)

    def _complete(self, job: ModerationJob, v: Verdict, t0: float) -> ModerationJob:
        job.status, job.safe, job.violations, job.scores = "COMPLETED", v.safe, v.violations, v.scores
        job.flaggedFrames, job.framesAnalyzed = v.flagged, v.frames
        job.tokens = v.frames * self._model().tokens_per_image
        job.processingTimeMs, job.completedAt = _ms(t0), now_iso()
        return job

    async def moderate_single(self, principal: Principal, req: _Moderate, input_type: str, input_url: str | None,
                              crops) -> ModerationJob:
        """One image or video: `crops` is an awaitable of its crops."""
        t0 = time.monotonic()
        job = self._job(input_url, input_type, req.metadata)

        async def work() -> None:
            self._complete(job, await self._verdict(await crops, self.thresholds(req)), t0)

        try:
            return await self.run(principal, "moderation", job, work())
        finally:
            crops.close()  # not awaited when the job was refused before it ran

    async def moderate_batch(self, principal: Principal, req: _Moderate,
                             inputs: list[tuple[str | None, Any]]) -> ModerationJob:
        """Many images, each failing on its own: `inputs` pairs a URL (or None
        for an upload) with an awaitable of its crops."""
        job = self._job(inputs[0][0], "image", req.metadata)
        job.inputUrls = [u for u, _ in inputs]
        try:
            return await self.run(principal, "moderation", job, self._batch(job, req, inputs))
        finally:
            for _, crops in inputs:
                crops.close()

    async def _batch(self, job: ModerationJob, req: _Moderate, inputs: list[tuple[str | None, Any]]) -> None:
        t0 = time.monotonic()
        thresholds = self.thresholds(req)

        async def item(index: int, url: str | None, crops) -> tuple[ModerationBatchItem, Verdict | None]:
            ti = time.monotonic()
            try:
                v = await self._verdict(await crops, thresholds)
            except StreamGuardError as exc:
                return ModerationBatchItem(index=index, inputUrl=url, errorMessage=str(exc), processingTimeMs=_ms(ti)), None
            return ModerationBatchItem(index=index, inputUrl=url, safe=v.safe, violations=v.violations,
                                       scores=v.scores, flaggedFrames=v.flagged, framesAnalyzed=v.frames,
                                       processingTimeMs=_ms(ti)), v

        results = await asyncio.gather(*(item(i, u, c) for i, (u, c) in enumerate(inputs)))
        job.batchItems = [r for r, _ in results]
        verdicts = [v for _, v in results if v is not None]
        if not verdicts:
            job.status, job.errorMessage = "FAILED", "no image in the batch could be moderated"
            job.processingTimeMs, job.completedAt = _ms(t0), now_iso()
            return
        scores = {k: max(v.scores[k] for v in verdicts) for k in verdicts[0].scores}
        names = {}
        for v in verdicts:
            for viol in v.violations:
                if viol.category not in names or viol.confidence > names[viol.category].confidence:
                    names[viol.category] = viol
        merged = Verdict(all(v.safe for v in verdicts), sorted(names.values(), key=lambda x: -x.confidence),
                         scores, [], sum(v.frames for v in verdicts))
        self._complete(job, merged, t0)

    async def categorize(self, principal: Principal, req: CategorizeRequest, input_type: str,
                         crops) -> CategorizationJob:
        t0 = time.monotonic()
        job = CategorizationJob(id=uuid.uuid4().hex, status="PROCESSING", inputUrl=req.inputUrl,
                                inputType=input_type, primaryCategory=None, confidence=None, categories=[], tags=[],
                                scores={}, framesAnalyzed=0, processingTimeMs=0, createdAt=now_iso(),
                                completedAt=None, metadata=req.metadata)

        async def work() -> None:
            analyzer = self._model()
            _, emb = await self._embeddings(await crops)
            result = summarize_categorization(analyzer.category_evidence(emb), req.topK)
            assert result is not None  # crops are never empty
            job.status, job.primaryCategory, job.confidence = "COMPLETED", result.primary, result.confidence
            job.categories, job.tags, job.scores, job.framesAnalyzed = (result.categories, result.tags,
                                                                        result.scores, result.frames)
            job.tokens = result.frames * analyzer.tokens_per_image
            job.processingTimeMs, job.completedAt = _ms(t0), now_iso()

        try:
            return await self.run(principal, "categorization", job, work())
        finally:
            crops.close()
