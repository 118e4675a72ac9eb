"""Multipart uploads streamed to disk. (Interface; implemented on the inputs branch.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Upload:
    files: list[Path] = field(default_factory=list)  # the file parts, in order, on disk
    fields: dict[str, str] = field(default_factory=dict)  # the other form values


async def receive_multipart(request: web.Request, dest_dir: Path, *, file_field: str, max_bytes: int,
                            max_files: int = 1) -> Upload:
    """Stream the `file_field` parts of a multipart request into `dest_dir`
    (never whole in memory). PayloadTooLarge (413) as soon as a file passes
    `max_bytes`, with its partial file removed; InputInvalid (400) for a
    request that is not multipart or lacks the file."""
    raise NotImplementedError
