"""`streamguard scan`: the pipeline on files or stream URLs, records on stdout.

Several inputs run concurrently (one ingest thread each) and share one
inference batcher, so their frames are batched together.

Ctrl-C (SIGINT) or SIGTERM stops every input at its next packet: the open
segment closes with what it has, gets its record, and each playlist gets
#EXT-X-ENDLIST; the exit status is 128 + the signal (130 for Ctrl-C). A stream
input never ends by itself, so this is how a live scan is meant to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import signal
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO, TypeVar

import numpy as np

from ..analysis.analyzer import Analyzer, resolve_model_dir
from ..analysis.logos import GalleryLogo, StaticGallery
from ..media.stills import still_image
from ..config import Settings
from ..threads import in_thread
from ..errors import InputInvalid, StreamGuardError
from ..media.source import MediaSource, SourceOptions
from ..pipeline.segments import ClosedSegment, MediaLocator, PipelineOptions, RecordAssembler, SegmentPipeline, StopMode
from ..schemas import encoder

log = logging.getLogger(__name__)

T = TypeVar("T")

# After a stop signal, how long the inputs get to close their last segment and
# print its record. An input still blocked on a silent source after that has
# its playlist closed for it and is left behind, so Ctrl-C ends a scan in under
# 2 s even when a source stops answering.
STOP_GRACE_SECONDS = 1.2


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


class ScanStop:
    """The stop request shared by the event loop (which sets it from the
    signal handler) and the ingest threads (which poll it at every packet)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._flag = threading.Event()
        self._event = asyncio.Event()

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self._flag.set()
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def mode(self) -> str | None:
        """`should_stop` for SegmentPipeline.consume (called from ingest threads)."""
        return StopMode.NOW if self._flag.is_set() else None

    async def wait(self) -> None:
        await self._event.wait()



async def _unless_stopped(fut: "asyncio.Future[T]", stop: ScanStop) -> tuple[bool, T | None]:
    """(True, result) when `fut` finished first, (False, None) when a stop came first."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({fut, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if fut.done():
        return True, fut.result()
    # Left behind: its outcome (say, a failed connect) no longer matters to anyone.
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return False, None


class InputScan:
    """One input of a scan: its source, pipeline and records."""

    def __init__(self, item: ScanInput, opts: PipelineOptions, src_opts: SourceOptions,
                 analyzer: Analyzer | None, stop: ScanStop) -> None:
        self.item = item
        self.opts = opts
        self.analyzer = analyzer
        self.stop = stop
        self.source = MediaSource(item.url, src_opts)
        self.pipe: SegmentPipeline | None = None
        self.segments = 0
        self._closed = False
        self._close_lock = threading.Lock()

    def close_playlists(self) -> bool:
        """#EXT-X-ENDLIST, once: by the ingest thread when it ends, or by the
        event loop for an input that did not stop in time. True if this call did it."""
        with self._close_lock:
            if self._closed or self.pipe is None:
                return False
            self._closed = True
            self.pipe.close()
            return True

    def _ingest(self, emit: Callable[[ClosedSegment], None]) -> str | None:
        try:
            self.pipe = SegmentPipeline(self.opts, self.item.task_dir, self.analyzer, emit)
            return self.pipe.consume(self.source, self.stop.mode)
        except Exception as exc:  # a bug must still end in one clear line, not a traceback
            log.exception("ingest of %s failed", self.item.url)
            return f"{self.item.url}: internal error: {exc!r} (run with -v for details)"
        finally:
            self.close_playlists()
            self.source.close()

    async def run(self, out: TextIO, progress: Progress) -> str | None:
        """Scan to the end of the input (or a stop); the error line, if any."""
        item = self.item
        try:
            opened, _ = await _unless_stopped(in_thread(self.source.open, f"open-{item.task_id}"), self.stop)
        except StreamGuardError as exc:
            return exc.message
        if not opened:
            return None  # stopped while connecting: nothing was written yet
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ClosedSegment | None] = asyncio.Queue()

        def emit(closed: ClosedSegment) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, closed)

        def ingest() -> str | None:
            try:
                return self._ingest(emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        ingest_done = in_thread(ingest, f"ingest-{item.task_id}")
        assembler = RecordAssembler(item.task_id, self.opts, self.analyzer, MediaLocator(item.task_dir, None))
        while (closed := await queue.get()) is not None:
            record = await assembler.build(closed)
            out.write(encoder.encode(record).decode() + "\n")
            out.flush()
            self.segments += 1
            progress.segment(item.task_id, closed)
        error = await ingest_done
        if error:
            return error
        if self.segments == 0 and not self.stop.requested:
            return f"{item.url}: no video frames could be read"
        return None


def _load_analyzer(settings: Settings, model_dir: str | None) -> "asyncio.Future[Analyzer]":
    def load() -> Analyzer:
        analyzer = Analyzer.create(settings, resolve_model_dir(settings, model_dir))
        analyzer.prepare()
        return analyzer
    return in_thread(load, "model-load")


async def _run_inputs(scans: list[InputScan], stop: ScanStop, out: TextIO, progress: Progress) -> list[str | None]:
    """Every input to its end; after a stop, at most STOP_GRACE_SECONDS more."""
    runs = asyncio.gather(*(s.run(out, progress) for s in scans))
    await _unless_stopped(runs, stop)
    if runs.done():
        return runs.result()
    done, _ = await asyncio.wait({runs}, timeout=STOP_GRACE_SECONDS)
    if done:
        return runs.result()
    runs.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runs  # let the cancelled inputs unwind
    for s in scans:
        if s.close_playlists():
            log.warning("%s did not stop within %.1f s (its source is not answering); "
                        "its last segment has no record", s.item.url, STOP_GRACE_SECONDS)
    return [None] * len(scans)


def scan_gallery(analyzer: Analyzer, logos: list[tuple[str, str]], max_pixels: int) -> StaticGallery:
    """The gallery of `scan --logo NAME=IMAGE ...` (blocking). A logo's id is
    derived from its name, so runs over the same names agree."""
    refs: dict[str, list[np.ndarray]] = {}
    for name, path in logos:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputInvalid(f"--logo {name}={path}: cannot read the image: {exc.strerror or exc}") from None
        try:
            image = still_image(data, max_pixels=max_pixels, field=f"--logo {name}")
        except InputInvalid as exc:
            raise InputInvalid(f"--logo {name}={path}: {exc.message}") from None
        refs.setdefault(name, []).append(analyzer.reference_embeddings(image))
    gallery = analyzer.gallery([GalleryLogo("logo_" + hashlib.sha256(name.encode()).hexdigest()[:16], name,
                                            np.concatenate(parts)) for name, parts in refs.items()])
    return StaticGallery(gallery)


async def run_scan(urls: list[str], settings: Settings, opts: PipelineOptions, *, out_dir: Path | None,
                   model_dir: str | None, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
                   logos: list[tuple[str, str]] | None = None) -> int:
    """`logos`: scan --logos with its --logo NAME=IMAGE pairs (None: no logo detection)."""
    loop = asyncio.get_running_loop()
    stop = ScanStop()
    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, stop.request, signum)
    analyzer = None
    try:
        if opts.analyze or logos is not None:
            try:
                loading = _load_analyzer(settings, model_dir)
                loaded, analyzer = await _unless_stopped(loading, stop)
                if loaded and logos is not None:
                    assert analyzer is not None
                    found = analyzer
                    gallery = await in_thread(lambda: scan_gallery(found, logos, settings.limits.max_image_pixels),
                                              "logo-gallery")
                    opts = dataclasses.replace(opts, logos=gallery)
            except StreamGuardError as exc:
                stderr.write(f"streamguard: error: {exc.message}\n")
                return 1
            if not loaded:
                # ONNX Runtime cannot be left half-built in a thread at exit (the
                # process would abort): the load finishes first, then the scan ends.
                with contextlib.suppress(StreamGuardError):
                    analyzer = await loading
                return 128 + (stop.signum or signal.SIGINT)
        p = settings.pipeline
        src_opts = SourceOptions(p.open_timeout, p.read_timeout, p.decode_threads)
        progress = Progress(stderr)
        scans = [InputScan(item, opts, src_opts, analyzer, stop) for item in plan_inputs(urls, out_dir, settings.data_dir)]
        try:
            errors = await _run_inputs(scans, stop, stdout, progress)
        finally:
            progress.done()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        if analyzer is not None:
            analyzer.close()  # the batcher finishes what was submitted: ONNX Runtime must not run at exit
    failed = [e for e in errors if e]
    for error in failed:
        stderr.write(f"streamguard: error: {error}\n")
    if stop.signum is not None:
        return 128 + stop.signum
    return 1 if failed else 0
