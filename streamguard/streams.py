"""Live stream tasks: start, stop, shed, drain; the record flow of each task.

Per task: a supervisor thread runs the media half (live.py); closed segments
come back over an asyncio queue in order; the consumer builds each record,
charges its tokens and stores it in one transaction (store), then, when the
supervisor ends, stores the terminal record (14/15/16/402) and the final state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import msgspec

from .analysis import Analyzer
from .delivery import DeliveryWorker, envelope, new_event_id, outbox_items, validate_url
from .config import Settings
from .errors import CapacityReached, FeatureUnavailable, InputInvalid, InsufficientBalance, NotFound, Unavailable
from .live import LiveSupervisor, TaskEnd
from .media.source import SourceOptions
from .metrics import Metrics
from .pipeline import ClosedSegment, MediaLocator, PipelineOptions, RecordAssembler, SegmentPipeline, StopMode
from .schemas import (STATUS_CAPACITY, STATUS_ERROR, STATUS_NO_BALANCE, STATUS_USER_STOPPED, SegmentRecord,
                      StreamRequest, encoder, status_record)
from .store import AsyncStore
from .store.sqlite import InsufficientBalance as StoreInsufficientBalance
from .store.sqlite import OutboxItem, Principal, Store, TaskRow, new_id

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtmp://", "rtmps://", "rtsp://", "rtsps://", "http://", "https://")


@dataclass
class RunningTask:
    row: TaskRow
    supervisor: LiveSupervisor
    queue: asyncio.Queue
    done: asyncio.Future
    consumer: asyncio.Task | None = None
    next_seq: int = 0
    # Ended at once (balance, shed): segments still in flight get no record.
    discard: bool = False


def validate_stream_request(req: StreamRequest) -> None:
    if not req.url.startswith(STREAM_SCHEMES):
        raise InputInvalid("url must be an rtmp://, rtmps://, rtsp:// or http(s):// (HLS) stream URL",
                           details={"field": "url"})
    if req.enable_logo_detection:
        raise FeatureUnavailable("logo detection is not available on this node yet",
                                 details={"field": "enable_logo_detection"})
    if req.enable_categorization:
        raise FeatureUnavailable("categorization is not available on this node yet",
                                 details={"field": "enable_categorization"})
    unknown = [r for r in req.renditions if r != "source"]
    if unknown:
        raise FeatureUnavailable(f"renditions {', '.join(unknown)} are not available on this node yet; "
                                 f"use [\"source\"]", details={"field": "renditions"})


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
    """Runs on the store thread: record, charge and deliveries in one transaction."""
    store.append_record(row.id, row.key_id, seq, status, body, outbox=_outbox(store, row, events), **kwargs)


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
    def __init__(self, settings: Settings, store: AsyncStore, analyzer: Analyzer, metrics: Metrics,
                 public_url: str, delivery: DeliveryWorker) -> None:
        self.settings = settings
        self.store = store
        self.delivery = delivery
        self.analyzer = analyzer
        self.metrics = metrics
        self.media_root = settings.data_dir / "media"
        self.public_url = public_url.rstrip("/")
        self.tasks: dict[str, RunningTask] = {}
        self.draining = False
        self._shedder: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    # --- queries --------------------------------------------------------------

    async def get(self, principal: Principal, task_id: str) -> TaskRow:
        row = await self.store(Store.task, task_id, principal.project_id)
        if row is None or row.kind != "stream":
            raise NotFound(f"stream task {task_id} not found")
        return row

    def playlist_url(self, task_id: str) -> str:
        return f"{self.public_url}/media/{task_id}/master.m3u8"

    # --- start / stop -----------------------------------------------------------

    async def start(self, principal: Principal, req: StreamRequest) -> TaskRow:
        validate_stream_request(req)
        if self.draining:
            raise Unavailable("this node is draining and accepts no new tasks")
        if len(self.tasks) >= self.settings.limits.max_tasks:
            raise CapacityReached(f"this node runs its maximum of {self.settings.limits.max_tasks} tasks",
                                  details={"max_tasks": self.settings.limits.max_tasks})
        balance = await self.store(Store.balance, principal.key_id)
        if balance is not None and balance <= 0:
            raise InsufficientBalance("the API key has no token balance left", details={"balance": balance})
        if req.callback_url:
            await validate_url(req.callback_url, "callback_url", self.settings.delivery.allow_private)
        row = TaskRow(id=new_id("tsk"), project_id=principal.project_id, key_id=principal.key_id, kind="stream",
                      url=req.url, params=msgspec.to_builtins(req), state="starting", created_at=time.time())
        await self.store(store_task, row, [task_event("stream.started", row, {"settings": row.params})])
        self.delivery.wake()
        self._launch(row, req)
        return row

    def _launch(self, row: TaskRow, req: StreamRequest) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ClosedSegment | None] = asyncio.Queue()
        analyzer = self.analyzer if req.enable_content_moderation else None
        opts = PipelineOptions(segment_seconds=req.segment_seconds, fps=req.fps, threshold=req.threshold,
                               moderate=req.enable_content_moderation)
        task_dir = self.media_root / row.id

        def emit(closed: ClosedSegment) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, closed)
            self.metrics.record_queue_depth.inc()

        pipeline = SegmentPipeline(opts, task_dir, analyzer, emit, next_index=row.next_seq,
                                   timeline_start=Fraction(row.timeline_end).limit_denominator(90000))
        p = self.settings.pipeline
        supervisor = LiveSupervisor(
            row.id, row.url, pipeline, SourceOptions(p.open_timeout, p.read_timeout, p.decode_threads),
            self.settings.live,
            on_restart=lambda reason, msg: loop.call_soon_threadsafe(self._on_restart, row.id, reason),
            on_connected=lambda: loop.call_soon_threadsafe(self._on_connected, row.id),
        )
        done: asyncio.Future[TaskEnd] = loop.create_future()
        task = RunningTask(row, supervisor, queue, done, next_seq=row.next_seq)
        self.tasks[row.id] = task
        self.metrics.active_tasks.inc()

        def run() -> None:
            try:
                end = supervisor.run()
            except Exception as exc:  # a bug ends this task, never the node
                log.exception("task %s: supervisor failed", row.id)
                end = TaskEnd(STATUS_ERROR, f"internal error: {exc!r}")
            loop.call_soon_threadsafe(queue.put_nowait, None)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(end))

        threading.Thread(target=run, name=f"ingest-{row.id}", daemon=True).start()
        assembler = RecordAssembler(row.id, opts, analyzer, MediaLocator(task_dir, f"{self.public_url}/media/{row.id}"))
        task.consumer = asyncio.create_task(self._consume(task, assembler), name=f"records-{row.id}")

    def _background(self, coro: Any) -> None:
        """Fire-and-forget store updates, held so they are not garbage-collected mid-flight."""
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _on_connected(self, task_id: str) -> None:
        if task_id in self.tasks:
            self._background(self.store(Store.set_task_state, task_id, "running"))

    def _on_restart(self, task_id: str, reason: str) -> None:
        self.metrics.reconnects.labels(reason).inc()
        self._background(self.store(Store.add_reconnect, task_id))

    async def stop(self, principal: Principal, task_id: str) -> TaskRow:
        row = await self.get(principal, task_id)
        task = self.tasks.get(task_id)
        if task is not None:
            task.supervisor.request_stop(StopMode.NOW, STATUS_USER_STOPPED, "stopped by user")
            await asyncio.shield(task.consumer)  # type: ignore[arg-type]
            row = await self.get(principal, task_id)
        return row

    # --- the record flow ----------------------------------------------------------

    async def _consume(self, task: RunningTask, assembler: RecordAssembler) -> None:
        row = task.row
        while (closed := await task.queue.get()) is not None:
            self.metrics.record_queue_depth.dec()
            self.metrics.frames_decoded.inc(closed.frames_decoded)
            self.metrics.frames_sampled.inc(len(closed.frames))
            for kind, count in closed.repairs.items():
                self.metrics.packets_repaired.labels(kind).inc(count)
            if task.discard:  # cut before the stop took effect: not paid, not sent
                for _, fut in closed.frames:
                    fut.cancel()
                continue
            record = await assembler.build(closed)
            if task.discard:  # the task ended at once while this segment was analysed
                continue
            await self._store_segment(task, closed, record)
        end: TaskEnd = await task.done
        await self._store_end(row, task.next_seq, end)
        self.metrics.segments.labels(str(end.status)).inc()
        self.metrics.tasks_ended.labels(str(end.status)).inc()
        self.metrics.active_tasks.dec()
        self.tasks.pop(row.id, None)
        log.info("task %s ended: %s %s", row.id, end.status, end.message)

    async def _store_end(self, row: TaskRow, seq: int, end: TaskEnd) -> None:
        await self.store(store_end, row, seq, end)
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
        task.next_seq = closed.segment.index + 1
        self.delivery.wake()
        self.metrics.segments.labels(str(body.status)).inc()
        self.metrics.segment_latency.observe(time.monotonic() - closed.closed_at)

    def _end_now(self, task: RunningTask, status: int, message: str) -> None:
        task.discard = True
        task.supervisor.request_stop(StopMode.NOW, status, message)
        task.supervisor.pipeline.cancel_frames()

    # --- capacity: shedding and draining ----------------------------------------------

    def start_shedder(self) -> None:
        self._shedder = asyncio.create_task(self._shed_loop(), name="shedder")

    async def _shed_loop(self, interval: float = 1.0, cooldown: float = 3.0) -> None:
        """Shed the newest task while inference is more than the allowed
        backlog behind real time *and* not catching up; after a shed, give the
        remaining tasks time to work their backlog off."""
        limit = self.settings.limits.max_backlog_seconds
        previous, last_shed = 0.0, float("-inf")
        while True:
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
        """SIGTERM: no new tasks; each running task ends with 16 after its in-flight segment."""
        self.draining = True
        if self._shedder is not None:
            self._shedder.cancel()
        for task in list(self.tasks.values()):
            task.supervisor.request_stop(StopMode.AFTER_SEGMENT, STATUS_CAPACITY, "node draining")
            self.metrics.tasks_shed.labels("drain").inc()
        consumers = [t.consumer for t in self.tasks.values() if t.consumer is not None]
        if not consumers:
            return
        _, pending = await asyncio.wait(consumers, timeout=self.settings.limits.drain_timeout)
        if pending:  # a segment that never closes: cut it now
            for task in list(self.tasks.values()):
                task.supervisor.escalate()
            await asyncio.wait(pending, timeout=30)

    async def resume_orphans(self) -> int:
        """Tasks a previous process left running (it crashed or was killed)
        carry on: same task, next segment_index, continuous timeline."""
        rows = await self.store(Store.tasks_in_state, "starting", "running")
        for row in rows:
            req = msgspec.convert(row.params, StreamRequest)
            log.warning("resuming task %s at segment %d (%.3f s)", row.id, row.next_seq, row.timeline_end)
            self._launch(row, req)
        return len(rows)
