"""Recognising inputs by content, not by name. (Interface; implemented on the inputs branch.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None  # seconds, when the container says
    width: int
    height: int
    has_audio: bool
    container: str  # FFmpeg's format name


def probe_video(path: Path) -> VideoInfo:
    """InputInvalid (400) unless `path` is a video file FFmpeg can decode."""
    raise NotImplementedError
