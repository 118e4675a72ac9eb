"""Live sources: a supervisor per task that connects, reads, reconnects with
backoff, and decides when the task ends.

Every (re)connection is logged and counted with its reason. The media
timeline and segment numbering continue across reconnects (the pipeline
carries them). A task ends with status 15 after `no_data_timeout` seconds
without video, whether the source refuses, stays silent or sends no video.

A source that ended is never reopened at its start: an http(s) source is
looked at before each (re)connect and not reopened while its HLS playlist has
`#EXT-X-ENDLIST` (FFmpeg would play it again as VOD), and a connection that
starts with video already delivered skips it (media.replay).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .config import LiveSettings
from .errors import AddressRefused, MediaError, SourceTimeout
from .media.probe import finished_playlist, is_http
from .media.replay import ReplayGuard
from .media.source import MediaSource, SourceOptions
from .pipeline import SegmentPipeline, StopMode
from .schemas import STATUS_NO_DATA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskEnd:
    status: int
    message: str


def classify(error: str | None, exc: BaseException | None = None) -> str:
    """A low-cardinality reason label for metrics."""
    if isinstance(exc, AddressRefused):
        return "address_refused"
    if isinstance(exc, SourceTimeout) or (error and "timed out" in error):
        return "timeout"
    if error is None:
        return "end_of_stream"
    text = error.lower()
    if "refused" in text:
        return "refused"
    if exc is not None:
        return "connect_failed"
    return "read_error"


class LiveSupervisor:
    def __init__(self, task_id: str, url: str, pipeline: SegmentPipeline, source_options: SourceOptions,
                 settings: LiveSettings, *, on_restart: Callable[[str, str], None] = lambda r, m: None,
                 on_connected: Callable[[], None] = lambda: None,
                 admit: Callable[[str], None] = lambda url: None) -> None:
        self.task_id = task_id
        self.url = url
        self.pipeline = pipeline
        self.settings = settings
        self.source_options = SourceOptions(
            open_timeout=min(source_options.open_timeout, settings.open_timeout),
            read_timeout=min(settings.read_timeout, settings.no_data_timeout),
            decode_threads=source_options.decode_threads,
        )
        self.on_restart = on_restart
        self.on_connected = on_connected
        # Address rules, checked before every (re)connect; raises AddressRefused.
        self.admit = admit
        self.last_error: str | None = None
        self._stop: tuple[str, TaskEnd] | None = None
        self._wake = threading.Event()
        self._last_video = time.monotonic()
        self._connected_once = False
        self._replay = ReplayGuard(abort=self._overdue) if is_http(url) else None

    # --- control (any thread) -------------------------------------------------

    def request_stop(self, mode: str, status: int, message: str) -> None:
        """First request wins (a user stop is not overwritten by a later drain)."""
        if self._stop is None:
            self._stop = (mode, TaskEnd(status, message))
        self._wake.set()

    def escalate(self) -> None:
        """Turn a pending after-segment stop into an immediate one."""
        if self._stop is not None:
            self._stop = (StopMode.NOW, self._stop[1])

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    # --- the supervisor thread -------------------------------------------------

    def _should_stop(self) -> str | None:
        if self._stop is not None:
            return self._stop[0]
        idle = time.monotonic() - self._last_video
        if idle >= self.settings.no_data_timeout:  # connected, but no video arrives
            self.request_stop(StopMode.NOW, STATUS_NO_DATA, f"no video for {idle:.0f} s")
            return StopMode.NOW
        return None

    def _attempt_options(self) -> SourceOptions:
        """Opening may not outlast the no-data deadline (a server that accepts
        and stays silent must still end the task on time)."""
        remaining = self.settings.no_data_timeout - (time.monotonic() - self._last_video)
        opts = self.source_options
        return SourceOptions(open_timeout=max(0.5, min(opts.open_timeout, remaining)),
                             read_timeout=opts.read_timeout, decode_threads=opts.decode_threads)

    def _overdue(self) -> bool:
        return self._stop is not None or time.monotonic() - self._last_video >= self.settings.no_data_timeout

    def _ended(self) -> bool:
        """An http(s) source whose playlist ended is not reopened (that would
        replay it from its start): wait for the no-data deadline instead,
        looking again now and then in case it goes live again. True when the
        source was not reopened."""
        ended = finished_playlist(self.url, self._attempt_options().open_timeout, check_hop=self._admit_hop)
        if ended is None:
            return False
        if self.last_error != ended:
            self.last_error = ended
            log.warning("task %s: %s; not reopening it", self.task_id, ended)
        idle = time.monotonic() - self._last_video
        remaining = self.settings.no_data_timeout - idle
        if remaining <= 0:
            self.request_stop(StopMode.NOW, STATUS_NO_DATA, f"no video for {idle:.0f} s: {ended}")
        else:
            self._wake.wait(min(self.settings.reconnect_max_backoff, remaining))
        return True

    async def _admit_hop(self, url: str) -> None:
        """Redirects and variants the playlist check follows obey the same rules."""
        self.admit(url)

    def _on_video(self) -> None:
        self._last_video = time.monotonic()
        if not self._connected_once:
            self._connected_once = True
            self.on_connected()

    def run(self) -> TaskEnd:
        attempt = 0
        try:
            while self._stop is None:
                got_video_before = self._last_video
                exc: BaseException | None = None
                try:
                    self.admit(self.url)  # before anything connects, the playlist check included
                    if self._ended() or self._stop is not None:
                        continue
                    source = MediaSource(self.url, self._attempt_options(),
                                         timeline_start=self.pipeline.timeline_end, replay=self._replay)
                    source.open()
                except (MediaError, AddressRefused) as err:
                    exc, error = err, err.message
                else:
                    try:
                        error = self.pipeline.consume(source, self._should_stop, self._on_video)
                    finally:
                        source.close()
                if self._stop is not None:
                    break
                reason = classify(error, exc)
                self.last_error = error or "the stream ended"
                if self._last_video != got_video_before:
                    attempt = 0  # that connection delivered video: start the backoff afresh
                log.warning("task %s: source %s: %s; reconnecting", self.task_id, reason, self.last_error)
                self.on_restart(reason, self.last_error)
                idle = time.monotonic() - self._last_video
                remaining = self.settings.no_data_timeout - idle
                if remaining <= 0:
                    self.request_stop(StopMode.NOW, STATUS_NO_DATA,
                                      f"no video for {idle:.0f} s: {self.last_error}")
                    break
                delay = min(self.settings.reconnect_max_backoff, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
                attempt += 1
                self._wake.wait(min(delay, remaining))
        finally:
            self.pipeline.close()
        assert self._stop is not None
        return self._stop[1]
