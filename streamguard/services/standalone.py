"""Standalone, synchronous image moderation (CONTRACT §2, issue 11): fetch an
image by URL, decode it off the event loop, crop it exactly like a video frame
(media/scaler.py) and run it through the shared batcher with everything else."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from datetime import datetime, timezone
from fractions import Fraction

import av
import numpy as np

from ..analysis.analyzer import Analyzer
from ..analysis.scoring import category_thresholds
from ..config import Settings
from ..errors import InputInvalid, Unavailable
from ..inputs.fetch import FetchLimits, fetch_bytes
from ..inputs.sniff import probe_image
from ..media.scaler import CentreCropScaler
from ..schemas import ModerateImageRequest, ModerationJob, StandaloneFlaggedFrame

MAX_IMAGE_BYTES = 20 << 20
FETCH_TIMEOUT_S = 30.0


def decode_image(data: bytes, size: int, field: str = "inputUrl") -> np.ndarray:
    """The first frame of an image as a CLIP crop (size x size x 3 RGB); blocking."""
    probe_image(data, field=field)
    try:
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            return CentreCropScaler(size)(frame)
    except (av.FFmpegError, StopIteration, ValueError) as exc:
        raise InputInvalid(f"{field}: the image cannot be decoded ({exc})",
                           details={"field": field, "reason": "undecodable"}) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StandaloneService:
    def __init__(self, settings: Settings, analyzer: Analyzer | None) -> None:
        self.settings = settings
        self.analyzer = analyzer

    async def moderate_image(self, req: ModerateImageRequest) -> ModerationJob:
        if self.analyzer is None:
            raise Unavailable("moderation is unavailable on this node: no model loaded",
                              details={"reason": "model_not_loaded"})
        created, t0 = _now(), time.monotonic()
        data = await fetch_bytes(req.inputUrl, sources=self.settings.sources,
                                 limits=FetchLimits(max_bytes=MAX_IMAGE_BYTES, timeout=FETCH_TIMEOUT_S))
        loop = asyncio.get_running_loop()
        crop = await loop.run_in_executor(None, decode_image, data, self.analyzer.image_size)
        thresholds = category_thresholds(req.threshold, self.settings.pipeline.thresholds, req.thresholds)
        result = await self.analyzer.moderate([(Fraction(0), self.analyzer.submit(crop))], thresholds)
        return ModerationJob(
            id=uuid.uuid4().hex, status="completed", inputUrl=req.inputUrl, inputType="image",
            safe=not result.has_unsafe_content, violations=result.violations, scores=result.scores,
            flaggedFrames=[StandaloneFlaggedFrame(frameIndex=f.frame_index, violations=f.violations)
                           for f in result.flagged_frames],
            framesAnalyzed=result.frames_processed, processingTimeMs=round((time.monotonic() - t0) * 1000),
            createdAt=created, completedAt=_now(), metadata=req.metadata)
