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

Anything else that goes wrong inside a task (its media cannot be written, the
store fails, a bug) is the task's failure, not the source's: the supervisor
drops the connection and the in-flight segment, rebuilds the pipeline from the
last good position and carries on, logged and counted by reason; after
`max_failures` within `failure_window` seconds the task ends with status 16
and a message naming the cause.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from ..config import LiveSettings
from ..errors import AddressRefused, MediaError, SourceTimeout
from ..media.probe import finished_playlist, is_http
from ..media.replay import ReplayGuard
from ..media.source import MediaSource, SourceOptions
from .segments import SegmentPipeline, StopMode
from ..schemas import STATUS_CAPACITY, STATUS_NO_DATA
from ..store import store_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskEnd:
    status: int
    message: str


@dataclass(frozen=True)
class Failure:
    """An unexpected failure inside a task. `resume_at` (segment index, timeline
    seconds) is where the rebuilt pipeline starts; None: where the old one was."""

    reason: str  # low-cardinality metric label: media | store | internal
    message: str  # names the cause, without host paths
    resume_at: tuple[int, Fraction] | None = None


def describe_failure(exc: BaseException) -> Failure:
    """What an unexpected exception inside a task means, for the log, the
    metric and the task's final message."""
    if isinstance(exc, store_errors()):
        return Failure("store", f"store error: {exc}")
    if isinstance(exc, OSError):
        # The source's own I/O errors arrive as MediaError; an OSError here is
        # a file the task writes (segments, playlists, thumbnail).
        return Failure("media", f"cannot write media: {exc.strerror or exc}")
    return Failure("internal", f"internal error: {exc!r}")


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
                 rebuild: Callable[[int, Fraction], SegmentPipeline] | None = None,
                 on_failure: Callable[[Failure], None] = lambda f: None,
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
        self.rebuild = rebuild
        # Address rules, checked before every (re)connect; raises AddressRefused.
        self.admit = admit
        self.on_failure = on_failure
        self._failures: deque[float] = deque()
        self._failure_request: Failure | None = None  # from the record consumer (another thread)
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

    def fail(self, failure: Failure) -> None:
        """Report a failure found outside the ingest thread (the record
        consumer): the current connection ends and the pipeline restarts at
        `failure.resume_at`. A later report replaces an unhandled earlier one
        only when it resumes earlier (the consumer's position never moves back)."""
        current = self._failure_request
        if current is None or (failure.resume_at or (0, 0))[0] <= (current.resume_at or (0, 0))[0]:
            self._failure_request = failure
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    @property
    def abandoning(self) -> bool:
        """Segments cut now have no future: the task ends at once or its pipeline restarts."""
        return (self._stop is not None and self._stop[0] == StopMode.NOW) or self._failure_request is not None

    # --- the supervisor thread -------------------------------------------------

    def handed_off(self, waited: float) -> None:
        """The ingest thread waited `waited` s for the record consumer to take a
        segment (backpressure): time the source was not read, not silence."""
        self._last_video += waited

    def _should_stop(self) -> str | None:
        if self._stop is not None:
            return self._stop[0]
        if self._failure_request is not None:
            return StopMode.NOW  # this connection ends; run() restarts the pipeline
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

    def _read_once(self) -> tuple[str | None, BaseException | None]:
        """One connection: open the source and feed the pipeline until it ends.
        Returns (why reading ended, the open error if it never opened)."""
        try:
            self.admit(self.url)
        except AddressRefused as err:
            return err.message, err
        source = MediaSource(self.url, self._attempt_options(), timeline_start=self.pipeline.timeline_end,
                             replay=self._replay)
        try:
            source.open()
        except MediaError as err:
            return err.message, err
        try:
            return self.pipeline.consume(source, self._should_stop, self._on_video), None
        finally:
            source.close()

    def _take_failure(self) -> Failure | None:
        failure, self._failure_request = self._failure_request, None
        return failure

    def _restart(self, failure: Failure) -> bool:
        """Count the failure and rebuild the pipeline; False when the task ends
        (too many failures, or a stop request) instead."""
        window, limit = self.settings.failure_window, self.settings.max_failures
        while True:
            self.on_failure(failure)
            now = time.monotonic()
            self._failures.append(now)
            while self._failures and now - self._failures[0] > window:
                self._failures.popleft()
            if len(self._failures) >= limit:
                log.error("task %s: %s (%d failures within %.0f s): ending the task",
                          self.task_id, failure.message, len(self._failures), window)
                self.request_stop(StopMode.NOW, STATUS_CAPACITY,
                                  f"task failed {len(self._failures)} times within {window:.0f} s; "
                                  f"last: {failure.message}")
                return False
            log.warning("task %s: %s; restarting its pipeline (failure %d; %d within %.0f s end the task)",
                        self.task_id, failure.message, len(self._failures), limit, window)
            self.pipeline.cancel_frames()
            # Short pause so a failing disk or store is not hammered; a stop cuts it short.
            self._wake.clear()
            if self._stop is None:
                self._wake.wait(0.25 * 2 ** (len(self._failures) - 1))
            if self._stop is not None or self.rebuild is None:
                return self._stop is None
            index, start = failure.resume_at or (self.pipeline.next_index, self.pipeline.timeline_end)
            try:
                self.pipeline = self.rebuild(index, start)
                return True
            except Exception as exc:
                failure = describe_failure(exc)
                log.error("task %s: rebuilding the pipeline failed: %s", self.task_id, exc,
                          exc_info=failure.reason == "internal")

    def run(self) -> TaskEnd:
        attempt = 0
        try:
            while self._stop is None:
                got_video_before = self._last_video
                failure = self._take_failure()
                error: str | None = None
                exc: BaseException | None = None
                if failure is None:
                    try:
                        if self._ended() or self._stop is not None:
                            continue
                        error, exc = self._read_once()
                    except AddressRefused as err:  # a hop of the playlist check
                        error, exc = err.message, err
                    except Exception as err:  # the task's own failure, not the source's
                        failure = describe_failure(err)
                        log.error("task %s: pipeline failed: %s", self.task_id, err,
                                  exc_info=failure.reason == "internal")
                    # A consumer's report wins: it knows the last segment actually stored.
                    failure = self._take_failure() or failure
                if self._stop is not None:
                    break
                if failure is not None:
                    if not self._restart(failure):
                        break
                    attempt = 0
                    continue
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
            self.pipeline.cancel_frames()
            try:
                self.pipeline.close()
            except Exception as exc:  # the playlist cannot be closed (the same broken disk): the end stands
                log.error("task %s: closing its playlist failed: %s", self.task_id, exc)
        assert self._stop is not None
        return self._stop[1]
