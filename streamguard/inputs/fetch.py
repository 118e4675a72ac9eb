"""Fetching an input by URL to a local file. (Interface; implemented on the
inputs branch.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import SourcesSettings


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float  # seconds for the whole fetch, retries included
    retries: int = 3


async def download(url: str, dest: Path, *, sources: SourcesSettings, limits: FetchLimits) -> int:
    """Download `url` to `dest` (bytes written). Raises AddressRefused (422)
    for a refused address on any hop, InputUnreachable (502) when it cannot
    be fetched, PayloadTooLarge (413) past `limits.max_bytes`."""
    raise NotImplementedError
