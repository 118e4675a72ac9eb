"""`streamguard scan`: the pipeline on files or stream URLs, records on stdout.

Several inputs run concurrently (one ingest thread each) and share one
inference batcher, so their frames are batched together.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .analysis import Analyzer, resolve_model_dir
from .config import Settings
from .errors import StreamGuardError
from .media.source import MediaSource, SourceOptions
from .pipeline import ClosedSegment, IngestResult, MediaLocator, PipelineOptions, RecordAssembler, ingest
from .schemas import encoder

log = logging.getLogger(__name__)


@dataclass
class ScanInput:
    url: str
    task_id: str
    task_dir: Path


def task_id_for(url: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(url.split("?")[0]).stem).strip("-")[:40] or "input"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def plan_inputs(urls: list[str], out: Path | None, data_dir: Path) -> list[ScanInput]:
    """One input with --out writes into that folder; otherwise each input gets
    its own task folder under the media root."""
    plans = []
    for url in urls:
        task_id = task_id_for(url)
        if out is not None and len(urls) == 1:
            task_dir = out
        else:
            task_dir = (out or data_dir / "media") / task_id
        plans.append(ScanInput(url, task_id, task_dir))
    return plans


class Progress:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()

    def segment(self, task_id: str, closed: ClosedSegment) -> None:
        if self.enabled:
            self.stream.write(f"\r{task_id}: segment {closed.segment.index} "
                              f"[{closed.segment.start:.1f}s-{float(closed.segment.end):.1f}s]   ")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")


async def _scan_one(item: ScanInput, opts: PipelineOptions, src_opts: SourceOptions, analyzer: Analyzer | None,
                    pool: ThreadPoolExecutor, out: TextIO, progress: Progress) -> str | None:
    loop = asyncio.get_running_loop()
    source = MediaSource(item.url, src_opts)
    try:
        await loop.run_in_executor(pool, source.open)
    except StreamGuardError as exc:
        return exc.message
    queue: asyncio.Queue[ClosedSegment | None] = asyncio.Queue()

    def emit(closed: ClosedSegment) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, closed)

    def run() -> IngestResult:
        try:
            return ingest(source, opts, item.task_dir, analyzer, emit)
        except Exception as exc:  # a bug must still end in one clear line, not a traceback
            log.exception("ingest of %s failed", item.url)
            return IngestResult(error=f"{item.url}: internal error: {exc!r} (run with -v for details)")
        finally:
            source.close()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    ingest_done = loop.run_in_executor(pool, run)
    assembler = RecordAssembler(item.task_id, opts, analyzer, MediaLocator(item.task_dir, None))
    while (closed := await queue.get()) is not None:
        record = await assembler.build(closed)
        out.write(encoder.encode(record).decode() + "\n")
        out.flush()
        progress.segment(item.task_id, closed)
    result = await ingest_done
    if result.error:
        return result.error
    if result.segments == 0:
        return f"{item.url}: no video frames could be read"
    return None


async def run_scan(urls: list[str], settings: Settings, opts: PipelineOptions, *, out_dir: Path | None,
                   model_dir: str | None, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    analyzer = None
    loop = asyncio.get_running_loop()
    if opts.analyze:
        try:
            analyzer = await loop.run_in_executor(None, Analyzer.create, settings,
                                                  resolve_model_dir(settings, model_dir))
            await loop.run_in_executor(None, analyzer.prepare)
        except StreamGuardError as exc:
            stderr.write(f"streamguard: error: {exc.message}\n")
            return 1
    p = settings.pipeline
    src_opts = SourceOptions(p.open_timeout, p.read_timeout, p.decode_threads)
    progress = Progress(stderr)
    plans = plan_inputs(urls, out_dir, settings.data_dir)
    try:
        with ThreadPoolExecutor(max_workers=max(2, len(plans)), thread_name_prefix="ingest") as pool:
            errors = await asyncio.gather(*(
                _scan_one(item, opts, src_opts, analyzer, pool, stdout, progress) for item in plans))
    finally:
        progress.done()
        if analyzer is not None:
            analyzer.close()
    failed = [e for e in errors if e]
    for error in failed:
        stderr.write(f"streamguard: error: {error}\n")
    return 1 if failed else 0
