"""Frame-level alerts of a live task (CONTRACT §4, `stream.alert`).

Each sampled frame's embedding comes back from the batcher on its own, long
before the frame's segment closes; a task with an `alert_threshold` scores it
here at once. Every moderation category at or above the threshold whose
cooldown has passed raises an alert: a JPEG of the whole frame under the
task's media (`alerts/frame_<ms>.jpg`, one per frame whatever the number of
categories), the alert rows and their deliveries in one transaction, and the
delivery worker woken. The per-segment records are untouched.

Ordering: a task's alerts are an ordering stream of their own per destination
(OutboxItem.stream): an alert never waits behind records queued for a slow
receiver; alerts keep their order among themselves, records among theirs.

Cooldown: per category, on the task's timeline. A frame alerts for a category
only when no alert for that category was raised within
`alert_cooldown_seconds` of the frame's time, so frames scored in a burst
(inference catching up) are judged by when they were shown. A resumed task
reads its last alert times back from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..analysis.scoring import ModerationScorer, scores_dict, violations
from ..delivery.worker import DeliveryWorker, envelope, new_event_id, outbox_items
from ..media.hls import ALERTS_DIR, write_jpeg
from ..media.segmenter import fmt_time
from ..metrics import Metrics
from ..pipeline.segments import MediaLocator, SubmittedFrame
from ..schemas import StreamAlert, Violation, encoder
from ..store import AsyncStore
from ..store.sqlite import Store, TaskRow

log = logging.getLogger(__name__)

ALERT_EVENT = "stream.alert"
# The ordering scope of a task's alerts, beside its records' (OutboxItem.stream).
ALERT_STREAM = "alerts"

Alert = tuple[str, str, float, bytes, bytes]  # (event id, category, timeline seconds, data, event body)


def store_alerts(store: Store, row: TaskRow, alerts: list[Alert]) -> None:
    """Runs on the store thread: the alerts and their deliveries in one transaction."""
    project = store.project(row.project_id)
    if project is None:
        return
    callback = row.params.get("callback_url")
    outbox = [item for event_id, _, _, _, body in alerts
              for item in outbox_items(project, row.id, callback, ALERT_EVENT, body, event_id,
                                       stream=f"{row.id}/{ALERT_STREAM}")]
    store.add_alerts(row.id, row.project_id, [(e, c, t, data) for e, c, t, data, _ in alerts], outbox,
                     epoch=row.epoch)


class AlertWatcher:
    """One live task's alerts. `watch` is the pipeline's per-frame hook (the
    ingest thread); scoring and cooldown run on the event loop."""

    def __init__(self, row: TaskRow, threshold: float, cooldown: float, scorer: ModerationScorer,
                 media: MediaLocator, store: AsyncStore, delivery: DeliveryWorker, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.row = row
        self.threshold = threshold
        self.cooldown = cooldown
        self.scorer = scorer
        self.media = media
        self.store = store
        self.delivery = delivery
        self.metrics = metrics
        self.loop = loop
        self._last: dict[str, float] = {}  # per category, the timeline time of its last alert
        self._pending: set[asyncio.Task] = set()

    def restore(self, last: dict[str, float]) -> None:
        """Cooldowns of a resumed task (Store.last_alert_times)."""
        self._last.update(last)

    def watch(self, frame: SubmittedFrame) -> None:
        """Ingest thread: hear of the frame's embedding when it is ready."""
        frame.embedding.add_done_callback(lambda fut: self._ready(frame, fut))

    def _ready(self, frame: SubmittedFrame, fut: Future) -> None:
        """The batcher's thread (or the ingest thread, for an embedding reused
        from a frame already done): hand the result to the event loop."""
        if fut.cancelled() or fut.exception() is not None:
            return  # withdrawn (the task ended) or failed: the segment's record says so
        try:
            self.loop.call_soon_threadsafe(self._scored, frame, fut.result())
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _due(self, category: str, t: float) -> bool:
        last = self._last.get(category)
        return last is None or abs(t - last) >= self.cooldown

    def _scored(self, frame: SubmittedFrame, embedding: np.ndarray) -> None:
        t = float(frame.time)
        scores = scores_dict(self.scorer.score(embedding[None])[0])
        hits = [v for v in violations(scores, self.threshold) if self._due(v.category, t)]
        if not hits:
            return
        for v in hits:  # taken now, on the loop: the next frame already sees them
            self._last[v.category] = t
        task = self.loop.create_task(self._raise(frame, hits), name=f"alert-{self.row.id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _raise(self, frame: SubmittedFrame, hits: list[Violation]) -> None:
        name = f"frame_{round(frame.time * 1000):010d}.jpg"
        try:
            await self.loop.run_in_executor(None, _write_still, frame, self.media.task_dir / ALERTS_DIR / name)
        except OSError as exc:  # the alert matters more than its picture: it goes out without one
            log.warning("task %s: alert frame not written: %s", self.row.id, exc.strerror or exc)
        url = self.media.url(f"{ALERTS_DIR}/{name}")
        metadata = self.row.params.get("metadata")
        alerts: list[Alert] = []
        for v in hits:
            data = StreamAlert(task_id=self.row.id, category=v.category, confidence=v.confidence,
                               severity=v.severity, time=fmt_time(frame.time), segment_index=frame.segment_index,
                               frame_url=url)
            event_id = new_event_id()
            body = envelope(ALERT_EVENT, event_id, self.row.project_id, metadata, data)
            alerts.append((event_id, v.category, float(frame.time), encoder.encode(data), body))
        try:
            await self.store(store_alerts, self.row, alerts)
        except Exception as exc:  # the store is failing; the task's own records report that
            log.error("task %s: %d alert(s) at %s s not stored: %s", self.row.id, len(alerts),
                      fmt_time(frame.time), exc)
            return
        self.delivery.wake()
        self.metrics.alert_latency.observe(time.monotonic() - frame.sampled_at)
        for v in hits:
            self.metrics.alerts.labels(v.category).inc()
        log.info("task %s: alert %s at %s s (%s)", self.row.id, ", ".join(v.category for v in hits),
                 fmt_time(frame.time), url)


def _write_still(frame: SubmittedFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jpeg(frame.still, path)
