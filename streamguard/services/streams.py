"""Live stream tasks: start, stop, shed, drain; the record flow of each task.

Per task: a supervisor thread runs the media half (live.py); closed segments
come back over an asyncio queue in order; the consumer builds each record,
charges its tokens and stores it in one transaction (store), then, when the
supervisor ends, stores the terminal record (14/15/16/402) and the final state.

Media is written under the media root and published to the node's media
storage (storage.media): served from there under /media, or, on an S3 node,
uploaded by the task's MediaMirror as each file closes (a segment before the
playlist that lists it); playlist_url and the records' video_url point at
the storage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import msgspec

from ..addresses import check_source_url, source_admission, validate_callback_url
from ..analysis.analyzer import Analyzer
from ..delivery.worker import DeliveryWorker, envelope, new_event_id, outbox_items
from ..config import Settings
from ..errors import CapacityReached, FeatureUnavailable, InputInvalid, InsufficientBalance, NotFound, Unavailable
from ..pipeline.live import Failure, LiveSupervisor, TaskEnd, describe_failure
from ..media.probe import check_live_source
from ..media.hls import LiveMedia
from ..media.retention import DiskSpace
from ..media.storage import LocalStorage, MediaMirror, MediaStorage
from ..media.source import SourceOptions
from ..metrics import Metrics
from ..media.ladder import is_preset
from ..analysis.logos import GallerySource
from .logos import LogoService
from ..pipeline.segments import ClosedSegment, MediaLocator, PipelineOptions, RecordAssembler, SegmentPipeline, StopMode
from ..schemas import (STATUS_CAPACITY, AlertQuery, STATUS_NO_BALANCE, STATUS_USER_STOPPED, STREAM_SCHEMES,
                      RecordQuery, SegmentRecord, StreamListQuery, StreamRequest, encoder, status_record)
from ..store import AsyncStore
from ..store.sqlite import InsufficientBalance as StoreInsufficientBalance
from ..store.sqlite import KeyRevoked, LeaseLost, OutboxItem, Principal, Store, TaskRow, new_id
from .alerts import AlertWatcher
from .cluster import Ownership

log = logging.getLogger(__name__)



# Closed segments the ingest thread may hand over before it waits for the
# record consumer. A consumer that far behind is blocked on the store (each
# attempt bounded by the busy timeout) or on inference (which the shedder
# watches); the queue holds futures and metadata only, a few KB a segment.
MAX_PENDING_SEGMENTS = 8
# How often running tasks check for a revoked key when they have no record to
# store (a record's own transaction checks it every segment).
REVOCATION_CHECK_SECONDS = 2.0
# How long `stop` waits for the terminal record before answering with the
# task's state as stored (the stop stands either way).
STOP_WAIT_SECONDS = 15.0


class SegmentQueue:
    """Closed segments from the ingest thread to the record consumer, in
    order, bounded: when `limit` are pending, the ingest thread waits
    (backpressure) and gives a segment up only when the task is ending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = MAX_PENDING_SEGMENTS) -> None:
        self._loop = loop
        self._slots = threading.Semaphore(limit)
        self._queue: asyncio.Queue[ClosedSegment | None] = asyncio.Queue()

    def put(self, closed: ClosedSegment, abandon: Callable[[], bool]) -> bool:
        """Ingest thread. False when the segment was given up (its frames withdrawn)."""
        while not self._slots.acquire(timeout=0.25):
            if abandon():
                for _, fut in closed.frames:
                    fut.cancel()
                for probe in closed.probes:
                    probe.cancel()
                return False
        self._call(self._queue.put_nowait, closed)
        return True

    def close(self) -> None:
        """Ingest thread: no more segments (takes no slot)."""
        self._call(self._queue.put_nowait, None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    async def get(self) -> ClosedSegment | None:
        item = await self._queue.get()
        if item is not None:
            self._slots.release()
        return item


@dataclass
class RunningTask:
    row: TaskRow
    supervisor: LiveSupervisor
    queue: SegmentQueue
    done: asyncio.Future
    consumer: asyncio.Task | None = None
    next_seq: int = 0  # the next segment_index to store: records tile, with no gaps
    timeline_end: Fraction = Fraction(0)  # where the last stored segment ended
    # Ended at once (balance, shed, revoked key): segments still in flight get no record.
    discard: bool = False
    mirror: MediaMirror | None = None  # publishes its media to the node's S3 storage
    # Another node took the task over: this node writes nothing more for it.
    lost: bool = False
    # Draining on a shared store: after its in-flight segment the task is
    # handed to another node (lease released), not ended.
    handover: bool = False


@dataclass
class PreparedTask:
    """Everything a task needs that can fail, made before its row is stored."""

    row: TaskRow
    opts: PipelineOptions
    analyzer: Analyzer | None
    pipeline: SegmentPipeline
    queue: SegmentQueue
    make_pipeline: Callable[[int, Fraction], SegmentPipeline]
    supervisor: list[LiveSupervisor]  # emit's view of the supervisor, bound in _run
    alerts: AlertWatcher | None = None  # frame-level alerts (alert_threshold set)
    mirror: MediaMirror | None = None


# Live encoded renditions must keep up with real time: a lighter x264 preset
# than a file job's default.
LIVE_X264_PRESET = "veryfast"


def task_weight(renditions: list[str] | tuple[str, ...]) -> int:
    """Capacity slots a live task takes against limits.max_tasks: 1, plus 1
    per encoded rendition (live transcoding costs CPU: a task encoding
    360p+720p counts as 3)."""
    return 1 + sum(1 for r in renditions if is_preset(r))


def validate_stream_request(req: StreamRequest) -> None:
    if not req.url.startswith(STREAM_SCHEMES):
        raise InputInvalid("url must be an rtmp://, rtmps://, rtsp:// or http(s):// (HLS) stream URL",
                           details={"field": "url"})


def needs_model(req: StreamRequest) -> bool:
    """Whether the task analyses frames (moderation, categorization or logos)."""
    return req.enable_content_moderation or req.enable_categorization or req.enable_logo_detection


Event = tuple[str, str, bytes]  # (event name, event id, body)


def _outbox(store: Store, row: TaskRow, events: list[Event]) -> list[OutboxItem]:
    project = store.project(row.project_id)
    if project is None:
        return []
    callback = row.params.get("callback_url")
    return [item for name, event_id, body in events
            for item in outbox_items(project, row.id, callback, name, body, event_id)]


def store_task(store: Store, row: TaskRow, events: list[Event]) -> None:
    """Runs on the store thread: the task and its events in one transaction."""
    store.create_task(row, outbox=_outbox(store, row, events))


def store_record(store: Store, row: TaskRow, seq: int, status: int, body: bytes, events: list[Event],
                 **kwargs: Any) -> None:
    """Runs on the store thread: record, charge and deliveries in one
    transaction, under the epoch this node claimed the task with (LeaseLost if stale)."""
    store.append_record(row.id, row.key_id, seq, status, body, outbox=_outbox(store, row, events),
                        epoch=row.epoch, **kwargs)


def assign_task(store: Store, row: TaskRow, events: list[Event], alive_after: float) -> bool:
    """Runs on the store thread: the task, for `row.node` to claim, and its events in one transaction."""
    return store.assign_task(row, _outbox(store, row, events), alive_after)


def store_end(store: Store, row: TaskRow, seq: int, end: TaskEnd) -> None:
    """Runs on the store thread: the terminal record, the stream.stopped event
    (with the task's final counts) and the final state, in one transaction."""
    final = encoder.encode(status_record(row.id, end.status, end.message))
    current = store.task(row.id)
    counts = {"segments": current.segments, "flagged_segments": current.flagged_segments} if current else {}
    stopped = task_event("stream.stopped", row, {"status": end.status, "reason": end.message, **counts})
    store_record(store, row, seq, end.status, final, [segment_event(final), stopped],
                 final_state=(end.status, end.message))


def segment_event(record_body: bytes) -> Event:
    return ("stream.segment", new_event_id(), record_body)


def task_event(name: str, row: TaskRow, data: dict[str, Any]) -> Event:
    event_id = new_event_id()
    return (name, event_id, envelope(name, event_id, row.project_id, row.params.get("metadata"),
                                     {"task_id": row.id, "url": row.url, **data}))


class StreamService:
    def __init__(self, settings: Settings, store: AsyncStore, analyzer: Analyzer | None, metrics: Metrics,
                 public_url: str, delivery: DeliveryWorker, *, disk: DiskSpace | None = None,
                 model_error: str | None = None, storage: MediaStorage | None = None,
                 ownership: Ownership | None = None, logos: LogoService | None = None) -> None:
        self.settings = settings
        self.logos = logos  # the project galleries (None: logo detection off on this node)
        self.store = store
        self.delivery = delivery
        self.storage = storage or LocalStorage(settings.data_dir / "media", f"{public_url.rstrip('/')}/media")
        self.analyzer = analyzer
        self.model_error = model_error  # why analyzer is None
        self.disk = disk or DiskSpace(settings.data_dir, settings.storage.min_free_bytes)
        self.ownership = ownership or Ownership.of(settings)
        own = self.ownership
        self.live_media = LiveMedia(window_seconds=settings.live.playlist_window_seconds,
                                    max_age_seconds=settings.storage.media_retention_hours * 3600,
                                    # no media while this node's leases may have passed to another node
                                    may_write=lambda: self.disk.ok() and own.fresh())
        self.metrics = metrics
        self.media_root = settings.data_dir / "media"
        self.public_url = public_url.rstrip("/")
        self.tasks: dict[str, RunningTask] = {}
        self._admitting = 0  # starts holding a capacity slot, not yet in self.tasks
        # Ended tasks whose terminal record is not stored yet (the store is failing): what GET shows meanwhile.
        self._ended: dict[str, TaskEnd] = {}
        self.draining = False
        self._loops: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self._lost: set[str] = set()  # tasks another node took over from this one: no more writes here
        self._stopping: set[str] = set()  # tasks another node ran, being ended here (stop)

    # --- queries --------------------------------------------------------------

    async def get(self, principal: Principal, task_id: str) -> TaskRow:
        row = await self.store(Store.task, task_id, principal.project_id)
        if row is None or row.kind != "stream":
            raise NotFound(f"stream task {task_id} not found")
        end = self._ended.get(task_id)
        if end is not None and row.state != "stopped":
            row.state, row.final_status, row.final_message = "stopped", end.status, end.message
        return row

    async def list_tasks(self, principal: Principal, query: StreamListQuery) -> tuple[list[TaskRow], int]:
        return await self.store(Store.list_tasks, principal.project_id, "stream", query.state or None,
                                query.page, query.pageSize)

    async def records(self, principal: Principal, task_id: str,
                      query: RecordQuery) -> tuple[TaskRow, list[tuple[int, bytes]]]:
        """The task (as read before its records, so a stopped state means no more will come) and
        its stored records (segment_index, body) after `query.after`, oldest first."""
        row = await self.get(principal, task_id)
        return row, await self.store(Store.records, row.id, query.after, query.limit)

    async def alerts(self, principal: Principal, task_id: str | None,
                     query: AlertQuery) -> list[tuple[int, str, bytes, float]]:
        """Stored alerts (alert_index, event id, data, created) after `query.after`,
        oldest first: the project's, or one task's (404 for another project's)."""
        if task_id is not None:
            await self.get(principal, task_id)
        return await self.store(Store.alerts, principal.project_id, task_id, query.after, query.limit)

    def locator(self, task_id: str) -> MediaLocator:
        """Where a task's media is written and the URL it is served under."""
        return MediaLocator(self.media_root / task_id, f"{self.public_url}/media/{task_id}")

    def playlist_url(self, task_id: str) -> str:
        return self.storage.url(f"{task_id}/master.m3u8")

    # --- start / stop -----------------------------------------------------------

    def _capacity_used(self) -> int:
        return sum(task_weight(t.row.params.get("renditions") or ["source"]) for t in self.tasks.values()) \
            + self._admitting

    def _admit(self, weight: int = 1) -> None:
        """Take `weight` capacity slots, synchronously: no await between the
        check and the taking, so concurrent starts can never overshoot `max_tasks`."""
        if self.draining:
            raise Unavailable("this node is draining and accepts no new tasks")
        limit = self.settings.limits.max_tasks
        if self._capacity_used() + weight > limit:
            raise CapacityReached(f"this node runs its maximum of {limit} tasks"
                                  + (f" (this one counts {weight}: 1 + its encoded renditions)" if weight > 1 else ""),
                                  details={"max_tasks": limit, "weight": weight})
        self._admitting += weight

    async def start(self, principal: Principal, req: StreamRequest) -> TaskRow:
        """All or nothing: every check and everything that can fail (the media
        dir, the pipeline) comes before the task and its `stream.started` event
        are stored; a failed start stores nothing and frees its slot."""
        validate_stream_request(req)
        self.check_admission(needs_model(req))
        weight = task_weight(req.renditions)
        target = await self._place(weight)
        if target != self.ownership.node:
            return await self._start_on(target, principal, req, weight)
        self._admit(weight)
        try:
            await self._check_request(principal, req)
            row = self._new_row(principal, req, weight, self.ownership.node)
            row.epoch = 1  # claimed by this node as it is stored
            row.lease_until = time.time() + self.ownership.lease_seconds
            try:
                prepared = self._prepare(row, req)
            except OSError as exc:
                log.error("task %s not started: its media dir is not writable: %s", row.id, exc)
                raise Unavailable(f"this node cannot write media: {exc.strerror or exc}") from None
        except BaseException:
            self._admitting -= weight
            raise
        # Once the row may be written the start completes even if the caller
        # goes away (a stored task must run, never linger as a ghost).
        commit = asyncio.create_task(self._commit(prepared), name=f"start-{row.id}")
        self._pending.add(commit)
        commit.add_done_callback(self._pending.discard)
        await asyncio.shield(commit)
        return row

    async def _check_request(self, principal: Principal, req: StreamRequest) -> None:
        """What a start checks before anything is stored: balance, addresses, a live source."""
        balance = await self.store(Store.balance, principal.key_id)
        if balance is not None and balance <= 0:
            raise InsufficientBalance("the API key has no token balance left", details={"balance": balance})
        await check_source_url(req.url, self.settings.sources)
        if req.callback_url:
            await validate_callback_url(req.callback_url, "callback_url", self.settings.delivery)
        # A recording is a file job; each hop the probe follows obeys the address rules.
        await check_live_source(req.url, self.settings.live.open_timeout,
                                check_hop=lambda url: check_source_url(url, self.settings.sources))

    @staticmethod
    def _new_row(principal: Principal, req: StreamRequest, weight: int, node: str) -> TaskRow:
        return TaskRow(id=new_id("tsk"), project_id=principal.project_id, key_id=principal.key_id,
                       kind="stream", url=req.url, params=msgspec.to_builtins(req), state="starting",
                       created_at=time.time(), node=node, weight=weight)

    async def _place(self, weight: int) -> str:
        """The node a new task goes to: on a shared store, the live node with
        the most free capacity (this one on a tie); 429 when none has room for it."""
        own = self.ownership
        if not own.shared:
            return own.node
        if self.draining:
            raise Unavailable("this node is draining and accepts no new tasks")
        free = await self.store(Store.free_capacity, time.time() - own.lease_seconds)
        # this node's own count is exact and includes starts in flight
        free[own.node] = self.settings.limits.max_tasks - self._capacity_used()
        best = max(free, key=lambda node: (free[node], node == own.node), default=None)
        if best is None or free[best] < weight:
            raise CapacityReached("every node runs its maximum of tasks",
                                  details={"weight": weight, "free": free})
        return best

    async def _start_on(self, node: str, principal: Principal, req: StreamRequest, weight: int) -> TaskRow:
        """Start a task on another node (it has more free capacity): stored
        assigned to it, with its `stream.started` event; that node claims it
        within a third of a lease. Its lease starts now, so if that node dies
        first another one takes the task."""
        await self._check_request(principal, req)
        row = self._new_row(principal, req, weight, node)
        row.lease_until = time.time() + self.ownership.lease_seconds
        started = [task_event("stream.started", row, {"settings": row.params})]
        if not await self.store(assign_task, row, started, time.time() - self.ownership.lease_seconds):
            raise CapacityReached(f"node {node} filled up meanwhile; try again", details={"node": node})
        log.info("task %s assigned to node %s", row.id, node)
        self.delivery.wake()
        return row

    async def _commit(self, prepared: PreparedTask) -> None:
        """Store the task and its `stream.started` event, then run it; the slot
        taken by `_admit` passes to the running task (or is freed)."""
        row = prepared.row
        try:
            await self.store(store_task, row, [task_event("stream.started", row, {"settings": row.params})])
        except BaseException:
            if prepared.mirror is not None:
                prepared.mirror.close(0)
            shutil.rmtree(self.media_root / row.id, ignore_errors=True)
            raise
        finally:
            self._admitting -= task_weight(prepared.opts.renditions)
        self._run(prepared)  # no await since the slot was released: it is taken again here
        self.delivery.wake()

    def check_admission(self, needs_model: bool) -> None:
        """503 for what this node cannot take now: disk below the floor, or
        analysis (moderation, categorization) without a loaded model."""
        low = self.disk.reason()
        if low is not None:
            raise Unavailable(f"not accepting new tasks: {low}",
                              details={"reason": "low_disk", "free_bytes": self.disk.free_bytes(),
                                       "min_free_bytes": self.disk.min_free_bytes})
        if needs_model and self.analyzer is None:
            raise Unavailable(
                f"moderation and categorization are unavailable on this node: {self.model_error}",
                details={"reason": "model_not_loaded"})

    def _gallery(self, project_id: str) -> GallerySource:
        if self.logos is None:
            raise FeatureUnavailable("logo detection is not available on this node",
                                     details={"field": "enable_logo_detection"})
        return self.logos.source(project_id)

    def _prepare(self, row: TaskRow, req: StreamRequest) -> PreparedTask:
        """The parts of a task that can fail before it runs (its media dir must be writable)."""
        loop = asyncio.get_running_loop()
        queue = SegmentQueue(loop)
        analyzer = self.analyzer if needs_model(req) else None
        p = self.settings.pipeline
        opts = PipelineOptions(segment_seconds=req.segment_seconds, fps=req.fps, threshold=req.threshold,
                               moderate=req.enable_content_moderation, categorize=req.enable_categorization,
                               top_k=p.categorization_top_k, thresholds={**p.thresholds, **(req.thresholds or {})},
                               renditions=tuple(req.renditions), x264_preset=LIVE_X264_PRESET,
                               logos=self._gallery(row.project_id) if req.enable_logo_detection else None,
                               max_logos=req.max_logos)
        task_dir = self.media_root / row.id
        supervisor: list[LiveSupervisor] = []  # set by _run, before the ingest thread starts
        alerts = None
        if req.alert_threshold is not None and analyzer is not None:
            alerts = AlertWatcher(row, req.alert_threshold, req.alert_cooldown_seconds, analyzer.scorer,
                                  self.locator(row.id), self.store, self.delivery, self.metrics, loop)
        live, mirror = self.live_media, None
        if self.storage.kind != LocalStorage.kind:
            task_dir.mkdir(parents=True, exist_ok=True)
            own = self.ownership
            mirror = MediaMirror(self.storage, task_dir, row.id,
                                 on_failure=lambda err: self.metrics.upload_failures.labels(err.reason).inc(),
                                 # a node whose lease may have passed must not overwrite the new owner's media
                                 may_put=lambda: own.fresh() and row.id not in self._lost)
            live = dataclasses.replace(live, publish=mirror)

        def emit(closed: ClosedSegment) -> None:
            t0 = time.monotonic()
            if queue.put(closed, lambda: supervisor[0].abandoning):
                self.metrics.record_queue_depth.inc()
            supervisor[0].handed_off(time.monotonic() - t0)

        def make_pipeline(next_index: int, timeline_start: Fraction) -> SegmentPipeline:
            pipeline = SegmentPipeline(opts, task_dir, analyzer, emit, next_index=next_index,
                                       timeline_start=timeline_start, live=live,
                                       on_frame=alerts.watch if alerts is not None else None)
            probe = task_dir / ".writable"  # fail now, not at the first segment
            probe.write_bytes(b"")
            probe.unlink()
            return pipeline

        try:
            pipeline = make_pipeline(row.next_seq, Fraction(row.timeline_end).limit_denominator(90000))
        except BaseException:
            if mirror is not None:
                mirror.close(0)
            raise
        return PreparedTask(row, opts, analyzer, pipeline, queue, make_pipeline, supervisor, alerts, mirror)

    def _run(self, prepared: PreparedTask) -> None:
        """Start a prepared task's ingest thread and record consumer."""
        loop = asyncio.get_running_loop()
        row, queue = prepared.row, prepared.queue
        p = self.settings.pipeline
        supervisor = LiveSupervisor(
            row.id, row.url, prepared.pipeline, SourceOptions(p.open_timeout, p.read_timeout, p.decode_threads),
            self.settings.live,
            on_restart=lambda reason, msg: loop.call_soon_threadsafe(self._on_restart, row.id, reason),
            on_connected=lambda: loop.call_soon_threadsafe(self._on_connected, row.id),
            rebuild=prepared.make_pipeline,
            on_failure=lambda failure: loop.call_soon_threadsafe(self._on_failure, failure),
            admit=source_admission(self.settings.sources),
        )
        prepared.supervisor.append(supervisor)
        done: asyncio.Future[TaskEnd] = loop.create_future()
        task = RunningTask(row, supervisor, queue, done, next_seq=row.next_seq,
                           timeline_end=prepared.pipeline.timeline_end, mirror=prepared.mirror)
        self.tasks[row.id] = task
        self.metrics.active_tasks.inc()

        def finish(end: TaskEnd) -> None:
            if not done.done():
                done.set_result(end)

        def run() -> None:
            self.metrics.ingest_threads.inc()
            try:
                end = supervisor.run()
            except Exception as exc:  # a bug ends this task, never the node; -1 never ends a task
                log.exception("task %s: supervisor failed", row.id)
                end = TaskEnd(STATUS_CAPACITY, f"internal error: {exc!r}")
            finally:
                self.metrics.ingest_threads.dec()
            queue.close()
            try:
                loop.call_soon_threadsafe(finish, end)
            except RuntimeError:  # the loop is closed: the process is exiting
                pass

        # records point at the node's media storage (alert frames stay under /media: locator)
        assembler = RecordAssembler(row.id, prepared.opts, prepared.analyzer,
                                    MediaLocator(self.media_root / row.id, self.storage.url(row.id)))
        task.consumer = asyncio.create_task(self._consume(task, assembler), name=f"records-{row.id}")
        try:
            threading.Thread(target=run, name=f"ingest-{row.id}", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: the task ends at once, defined
            log.error("task %s: cannot start its ingest thread: %s", row.id, exc)
            queue.close()
            finish(TaskEnd(STATUS_CAPACITY, f"capacity reached: cannot start an ingest thread ({exc})"))

    def _background(self, coro: Any, what: str) -> None:
        """Fire-and-forget store updates, held so they are not garbage-collected
        mid-flight; a failure is logged (the counter it updates is advisory)."""
        task = asyncio.create_task(coro)
        self._pending.add(task)

        def done(t: asyncio.Task) -> None:
            self._pending.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s failed: %s", what, t.exception())

        task.add_done_callback(done)

    def _on_connected(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            self._background(self.store(Store.set_task_state, task_id, "running", epoch=task.row.epoch),
                             f"task {task_id}: state")

    def _on_restart(self, task_id: str, reason: str) -> None:
        self.metrics.reconnects.labels(reason).inc()
        task = self.tasks.get(task_id)
        if task is not None:
            self._background(self.store(Store.add_reconnect, task_id, task.row.epoch),
                             f"task {task_id}: reconnect count")

    def _on_failure(self, failure: Failure) -> None:
        self.metrics.task_failures.labels(failure.reason).inc()

    async def stop(self, principal: Principal, task_id: str) -> TaskRow:
        row = await self.get(principal, task_id)
        task = self.tasks.get(task_id)
        if task is not None:
            task.supervisor.request_stop(StopMode.NOW, STATUS_USER_STOPPED, "stopped by user")
            assert task.consumer is not None
            # Bounded: a store that is failing must not hold the caller; the stop stands.
            await asyncio.wait([task.consumer], timeout=STOP_WAIT_SECONDS)
            row = await self.get(principal, task_id)
        elif self.ownership.shared and row.state != "stopped":
            # Another node runs it: take it over and end it here. Its owner's next
            # write is refused (stale epoch) and its next renewal drops it.
            self._stopping.add(task_id)  # this node's own claim rounds leave it alone meanwhile
            try:
                claimed = await self.store(Store.claim_task, task_id, self.ownership.claimant())
                if claimed is not None:
                    await self._store_end(claimed, claimed.next_seq,
                                          TaskEnd(STATUS_USER_STOPPED, "stopped by user"))
            finally:
                self._stopping.discard(task_id)
            row = await self.get(principal, task_id)
        return row

    # --- the record flow ----------------------------------------------------------

    async def _consume(self, task: RunningTask, assembler: RecordAssembler) -> None:
        """Never dies: a failure here is reported to the supervisor, which
        restarts the pipeline from the last stored segment or ends the task."""
        row = task.row
        while (closed := await task.queue.get()) is not None:
            self.metrics.record_queue_depth.dec()
            self.metrics.frames_decoded.inc(closed.frames_decoded)
            self.metrics.frames_sampled.inc(len(closed.frames))
            self.metrics.frames_reused.inc(closed.frames_reused)
            for kind, count in closed.repairs.items():
                self.metrics.packets_repaired.labels(kind).inc(count)
            # Cut before the stop took effect (not paid, not sent), or by a
            # pipeline that is being restarted from an earlier segment.
            if task.discard or closed.segment.index != task.next_seq:
                for _, fut in closed.frames:
                    fut.cancel()
                continue
            try:
                record = await assembler.build(closed)
                if task.discard:  # the task ended at once while this segment was analysed
                    continue
                await self._store_segment(task, closed, record)
            except Exception as exc:
                failure = describe_failure(exc)
                log.error("task %s: segment %d not stored: %s", row.id, closed.segment.index, failure.message,
                          exc_info=failure.reason == "internal")
                task.supervisor.fail(Failure(failure.reason, failure.message,
                                             resume_at=(task.next_seq, task.timeline_end)))
        end: TaskEnd = await task.done
        if task.lost or task.handover:
            self.tasks.pop(row.id, None)
            self.metrics.active_tasks.dec()
            if task.handover:  # its next segment_index and timeline are in the store: another node goes on
                await self._release(row)
            return
        # The slot and the running-task entry go now, stored or not: the node
        # must not keep a dead task. GET shows the end until it is stored.
        self._ended[row.id] = end
        self.tasks.pop(row.id, None)
        self.metrics.active_tasks.dec()
        self.metrics.tasks_ended.labels(str(end.status)).inc()
        log.info("task %s ended: %s %s", row.id, end.status, end.message)
        if task.mirror is not None:  # the last playlists (#EXT-X-ENDLIST) go up after the end is stored
            self._background(self._flush_mirror(row.id, task.mirror), f"task {row.id}: media upload")
        await self._store_end(row, task.next_seq, end)

    async def _flush_mirror(self, task_id: str, mirror: MediaMirror) -> None:
        timeout = self.settings.storage.s3.retry_seconds
        if not await asyncio.get_running_loop().run_in_executor(None, mirror.close, timeout):
            log.error("task %s: %d media file(s) not uploaded within %.0f s of its end", task_id,
                      mirror.stats.pending, timeout)

    async def _store_end(self, row: TaskRow, seq: int, end: TaskEnd) -> None:
        """The terminal record, retried until the store takes it (a failing
        store must not lose how the task ended); GET shows `_ended` meanwhile."""
        delay = 0.5
        while True:
            try:
                await self.store(store_end, row, seq, end)
                break
            except LeaseLost:  # another node runs the task now: it is that node's to end
                log.warning("task %s: not ended here: another node took it over", row.id)
                self._ended.pop(row.id, None)
                return
            except Exception as exc:
                log.error("task %s: terminal record not stored (%s); retrying in %.1f s", row.id, exc, delay)
                self.metrics.task_failures.labels(describe_failure(exc).reason).inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._ended.pop(row.id, None)
        self.metrics.segments.labels(str(end.status)).inc()
        self.delivery.wake()

    async def _store_segment(self, task: RunningTask, closed: ClosedSegment, record: SegmentRecord) -> None:
        body = record.data
        cost = body.token.total if body.token is not None else 0
        moderation = body.data.content_moderation if body.data is not None else None
        encoded = encoder.encode(record)
        try:
            await self.store(store_record, task.row, closed.segment.index, body.status, encoded,
                             [segment_event(encoded)], cost=cost,
                             flagged=bool(moderation and moderation.has_unsafe_content),
                             timeline_end=float(closed.segment.end))
        except StoreInsufficientBalance:
            self._end_now(task, STATUS_NO_BALANCE,
                          f"insufficient balance to pay segment {closed.segment.index} ({cost} tokens)")
            return
        except KeyRevoked:
            self._end_now(task, STATUS_USER_STOPPED, "API key revoked")
            return
        except LeaseLost:
            self.lost([task.row.id])
            return
        task.next_seq = closed.segment.index + 1
        task.timeline_end = closed.segment.end
        self.delivery.wake()
        self.metrics.segments.labels(str(body.status)).inc()
        self.metrics.segment_latency.observe(time.monotonic() - closed.closed_at)

    def _end_now(self, task: RunningTask, status: int, message: str) -> None:
        task.discard = True
        task.supervisor.request_stop(StopMode.NOW, status, message)
        task.supervisor.pipeline.cancel_frames()

    # --- capacity: shedding, revocation and draining -------------------------------------

    def start_shedder(self) -> None:
        """The node's watch loops: load shedding and revoked keys."""
        self._loops = [asyncio.create_task(self._shed_loop(), name="shedder"),
                       asyncio.create_task(self._revocation_loop(), name="revocations")]

    async def _revocation_loop(self, interval: float = REVOCATION_CHECK_SECONDS) -> None:
        """Keys are revoked by another process (`streamguard keys revoke` on
        the same store): a running task of a revoked key ends with 14 within
        `interval` seconds, or at its next record, whichever comes first."""
        while True:
            await asyncio.sleep(interval)
            running = [t for t in self.tasks.values() if not t.supervisor.stopping]
            if not running:
                continue
            try:
                revoked = await self.store(Store.revoked_keys, sorted({t.row.key_id for t in running}))
            except Exception as exc:  # the store is failing; the record transactions check as well
                log.warning("revocation check failed: %s", exc)
                continue
            for task in running:
                if task.row.key_id in revoked:
                    log.warning("task %s: API key revoked; ending the task", task.row.id)
                    self._end_now(task, STATUS_USER_STOPPED, "API key revoked")

    async def _shed_loop(self, interval: float = 1.0, cooldown: float = 3.0) -> None:
        """Shed the newest task while inference is more than the allowed
        backlog behind real time *and* not catching up; after a shed, give the
        remaining tasks time to work their backlog off."""
        limit = self.settings.limits.max_backlog_seconds
        previous, last_shed = 0.0, float("-inf")
        while self.analyzer is not None:  # without a model there is no inference to fall behind
            await asyncio.sleep(interval)
            self.metrics.queue_depth.set(self.analyzer.batcher.depth())
            lag = self.analyzer.batcher.oldest_wait()
            catching_up = lag < previous
            previous = lag
            if lag <= limit or catching_up or time.monotonic() - last_shed < cooldown:
                continue
            victims = sorted((t for t in self.tasks.values() if not t.supervisor.stopping),
                             key=lambda t: t.row.created_at, reverse=True)
            if victims:
                victim = victims[0]
                log.warning("inference is %.1f s behind (limit %.1f s): shedding task %s", lag, limit, victim.row.id)
                self._end_now(victim, STATUS_CAPACITY,
                              f"capacity reached: inference fell {lag:.0f} s behind; task shed")
                self.metrics.tasks_shed.labels("backlog").inc()
                last_shed = time.monotonic()

    async def drain(self) -> None:
        """SIGTERM: no new tasks; each running task ends with 16 after its
        in-flight segment; on a shared store it is handed over instead (its
        lease released: another node continues it with the next segment)."""
        self.draining = True
        for loop_task in self._loops:
            loop_task.cancel()
        for task in list(self.tasks.values()):
            task.handover = self.ownership.shared
            task.supervisor.request_stop(StopMode.AFTER_SEGMENT, STATUS_CAPACITY, "node draining")
            if not task.handover:
                self.metrics.tasks_shed.labels("drain").inc()
        consumers = [t.consumer for t in self.tasks.values() if t.consumer is not None]
        if not consumers:
            return
        _, pending = await asyncio.wait(consumers, timeout=self.settings.limits.drain_timeout)
        if pending:  # a segment that never closes: cut it now
            for task in list(self.tasks.values()):
                task.supervisor.escalate()
            await asyncio.wait(pending, timeout=30)

    # --- ownership: leases across nodes (services/cluster.py) ------------------------------

    def held(self) -> dict[str, int]:
        """{task id: epoch} of the tasks this node runs and still believes it owns."""
        return {task_id: t.row.epoch for task_id, t in self.tasks.items() if not t.lost}

    def lost(self, task_ids: list[str]) -> None:
        """Another node took these tasks over: stop them here at once, writing
        nothing more (no record, no terminal record; media stops as well)."""
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is None or task.lost:
                continue
            log.warning("task %s: lease lost (another node took it over); stopping it here without writing",
                        task_id)
            task.lost = True
            self._lost.add(task_id)
            self._end_now(task, STATUS_CAPACITY, "lease lost")

    async def _release(self, row: TaskRow) -> None:
        try:
            await self.store(Store.release_task, row.id, row.epoch)
            log.info("task %s handed over: its lease is released for another node", row.id)
        except Exception as exc:  # it lapses by itself within a lease
            log.warning("task %s: lease not released (%s); it lapses within %g s", row.id, exc,
                        self.ownership.lease_seconds)

    async def take_over(self) -> int:
        """Claim the live tasks this node should run now (its own left by a
        previous process, those assigned to it, and any whose lease ran out),
        as far as its free capacity goes, and run them on. Returns how many."""
        if self.draining:
            return 0
        own = self.ownership
        room = None if not own.shared else self.settings.limits.max_tasks - self._capacity_used()
        if room is not None and room <= 0:
            return 0
        # a single node resumes everything a previous process left at once; a cluster node a batch per round
        claimed = await self.store(Store.claim_tasks, own.claimant(), sorted({*self.tasks, *self._stopping}),
                                   room, 64 if own.shared else 1_000_000)
        for row, before in claimed:
            if row.id in self.tasks:  # cannot be: it was excluded; never run a task twice
                continue
            if own.shared and self._capacity_used() + row.weight > self.settings.limits.max_tasks:
                await self.store(Store.release_task, row.id, row.epoch)  # starts took the room meanwhile
                continue
            self._lost.discard(row.id)  # it may come back to a node that lost it once
            if before is not None and before != own.node and self.storage.kind != LocalStorage.kind:
                # what this node has of its media is from an earlier run here: the bucket has the rest
                shutil.rmtree(self.media_root / row.id, ignore_errors=True)
            if before is not None and before != own.node:
                self.metrics.lease_takeovers.inc()
                log.warning("task %s: taken over from node %s (epoch %d)", row.id, before, row.epoch)
            await self._resume(row)
        return len(claimed)

    async def resume_orphans(self) -> int:
        """Tasks a previous process left running (it crashed or was killed)
        carry on: same task, next segment_index, continuous timeline. They hold
        capacity slots like any task; one that cannot be prepared (its media
        dir is not writable) ends with 16 naming why. On a shared store the
        same happens for this node's own tasks, and for any other node's whose
        lease ran out (take_over, then every lease renewal)."""
        return await self.take_over()

    async def _resume(self, row: TaskRow) -> None:
        """Run a claimed task on from where the store says it got to."""
        try:
            req = msgspec.convert(row.params, StreamRequest)
        except msgspec.ValidationError as exc:  # stored before today's limits
            await self._store_end(row, row.next_seq, TaskEnd(
                STATUS_CAPACITY, f"cannot resume: its stored settings are no longer valid: {exc}"))
            return
        if needs_model(req) and self.analyzer is None:
            # never run a moderation task unmoderated: it ends, saying why
            await self._store_end(row, row.next_seq, TaskEnd(
                STATUS_CAPACITY, f"node cannot moderate: {self.model_error}"))
            return
        log.warning("resuming task %s at segment %d (%.3f s)", row.id, row.next_seq, row.timeline_end)
        try:
            prepared = self._prepare(row, req)
        except Exception as exc:
            failure = describe_failure(exc)
            log.error("task %s: cannot resume: %s", row.id, failure.message)
            self.metrics.task_failures.labels(failure.reason).inc()
            end = TaskEnd(STATUS_CAPACITY, f"cannot resume: {failure.message}")
            self._ended[row.id] = end
            # In the background: a store that cannot take it yet must not hold the daemon's start.
            self._background(self._store_end(row, row.next_seq, end), f"task {row.id}: terminal record")
            return
        if prepared.alerts is not None:  # its cooldowns carry on
            prepared.alerts.restore(await self.store(Store.last_alert_times, row.id))
        self._run(prepared)
