"""Writing a stream of chunks to a file without stalling the event loop."""

from __future__ import annotations

import asyncio
from typing import BinaryIO

WRITE_BUFFER = 1 << 20  # bytes gathered before one write to disk (in a thread)


class ChunkWriter:
    """Buffered writes done in a worker thread, so a slow disk never blocks
    the event loop; memory held is at most about WRITE_BUFFER."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.size = 0  # bytes written so far, buffered ones included
        self._buf = bytearray()

    async def write(self, chunk: bytes) -> None:
        self._buf += chunk
        self.size += len(chunk)
        if len(self._buf) >= WRITE_BUFFER:
            await self.flush()

    async def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            await asyncio.to_thread(self.fh.write, data)

    async def restart(self) -> None:
        """Empty the file: what was written is thrown away."""
        self._buf.clear()
        self.size = 0
        await asyncio.to_thread(self._truncate)

    def _truncate(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
