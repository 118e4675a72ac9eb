"""The inference batcher shared by every pipeline in the process.

Back-pressure policy: none is dropped here. Frames wait in one FIFO queue.
Two threads share the work so that preparing a batch overlaps running the
previous one:

- the collector takes frames from the queue into the next batch and, while
  the encoder is busy, prepares them (`prepare`: normalise to the model's
  float32 NCHW input) as they arrive; it hands the batch over as soon as the
  encoder is free and the batch is full or `max_wait` has passed since its
  first frame;
- the runner runs the encoder once per batch and completes the frames'
  futures.

While the encoder runs, frames keep accumulating into the next batch (it is
handed over only when the encoder is free), so batches grow under load
exactly as with one thread.

Batch size: at most `max_batch`, and with `budget` (seconds) at most the
number of frames whose measured encoder time fits in it (an exponentially
weighted mean of seconds per frame, never fewer than 1). The daemon leaves
the budget off by default: batches only grow when inference is behind, and
on CPU that is exactly when small batches cost throughput (ViT-B/32 does
~2.5x more images/s at batch 16 than at 1); on a GPU a run of max_batch
takes milliseconds.

Callers get a concurrent Future per frame, usable from threads and (wrapped)
from asyncio. Inference never runs on the event loop; ONNX Runtime releases
the GIL while it runs.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

Encoder = Callable[[Any], np.ndarray]
Prepare = Callable[[np.ndarray], Any]

_WAKE = object()  # the runner finished a batch
_EWMA = 0.3  # weight of the newest run in the per-frame time estimate

Item = tuple[np.ndarray, Future]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _concat(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class InferenceBatcher:
    def __init__(self, encode: Encoder, *, max_batch: int = 32, max_wait: float = 0.02,
                 on_batch: Callable[[int, float], None] | None = None,
                 prepare: Prepare | None = None, budget: float = 0.0) -> None:
        """`prepare` maps a stack of submitted frames to the encoder's input
        (chunks of a batch are prepared apart and concatenated); `encode` maps
        that input to one row per frame."""
        self._encode = encode
        self._prepare = prepare or _identity
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.budget = budget
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[Item | object | None] = queue.SimpleQueue()
        self._handoff: queue.SimpleQueue[tuple[list[Item], Any] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._per_frame = 0.0  # seconds per frame, measured
        self._enqueued: collections.deque[float] = collections.deque()  # submit times, oldest first
        self._closed = False
        self._collector = threading.Thread(target=self._collect_loop, name="inference-collect", daemon=True)
        self._thread = threading.Thread(target=self._run_loop, name="inference-batcher", daemon=True)
        self._collector.start()
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("inference batcher is closed"))
        else:
            self._enqueued.append(time.monotonic())
            self._queue.put((image, fut))
        return fut

    def depth(self) -> int:
        return len(self._enqueued)

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting frame has waited: how far inference is behind."""
        try:
            return time.monotonic() - self._enqueued[0]
        except IndexError:
            return 0.0

    def batch_cap(self) -> int:
        """The largest batch to form now (max_batch, or fewer within the budget)."""
        if self.budget <= 0 or self._per_frame <= 0:
            return self.max_batch
        return max(1, min(self.max_batch, int(self.budget / self._per_frame)))

    def close(self) -> None:
        """Finish what was submitted, then stop both threads."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._collector.join(timeout=30)
            self._thread.join(timeout=30)

    # --- collector ----------------------------------------------------------------

    def _collect_loop(self) -> None:
        batch: list[Item] = []
        parts: list[Any] = []  # prepared chunks of batch, in order
        prepared = 0  # frames of batch covered by parts
        deadline = 0.0
        stopping = False
        while True:
            idle = self._idle.is_set()
            cap = self.batch_cap()
            if batch and idle and (len(batch) >= cap or stopping or time.monotonic() >= deadline):
                send, batch = batch[:cap], batch[cap:]
                parts, prepared = self._take(send, parts, prepared)
                if batch:
                    deadline = time.monotonic()  # the rest already waited: next run, no extra wait
                continue
            if stopping and not batch:
                self._handoff.put(None)
                return
            if len(batch) >= cap or stopping:
                if prepared < len(batch):  # the encoder is busy: prepare while it runs
                    parts.append(self._prepare_frames(batch[prepared:]))
                    prepared = len(batch)
                self._idle.wait()  # full (or closing): wait for the runner
                continue
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if not idle and prepared < len(batch):
                    # Nothing new and the encoder is busy: prepare what is here.
                    parts.append(self._prepare_frames(batch[prepared:]))
                    prepared = len(batch)
                    continue
                timeout = max(0.0, deadline - time.monotonic()) if batch and idle else None
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    continue
            if item is None:
                stopping = True
            elif item is not _WAKE:
                if not batch:
                    deadline = time.monotonic() + self.max_wait
                batch.append(item)  # type: ignore[arg-type]

    def _prepare_frames(self, items: list[Item]) -> Any:
        try:
            return self._prepare(np.stack([img for img, _ in items]))
        except Exception as exc:  # noqa: BLE001 - reported to the frames' callers by the runner
            return exc

    def _take(self, send: list[Item], parts: list[Any], prepared: int) -> tuple[list[Any], int]:
        """Hand `send` (the head of the batch) to the runner; returns the
        prepared parts left over for the rest of the batch."""
        if prepared < len(send):
            parts.append(self._prepare_frames(send[prepared:]))
            prepared = len(send)
        # Split parts at len(send): a prepared chunk may straddle the cut.
        mine, rest, n = [], [], 0
        for part in parts:
            size = 0 if isinstance(part, Exception) else len(part)
            if isinstance(part, Exception) or n + size <= len(send):
                mine.append(part)
            elif n >= len(send):
                rest.append(part)
            else:
                mine.append(part[: len(send) - n])
                rest.append(part[len(send) - n:])
            n += size
        for _ in send:
            self._enqueued.popleft()
        # From here a frame can no longer be withdrawn; one withdrawn before
        # (a stopped or shed task's backlog) is not run.
        live = [fut.set_running_or_notify_cancel() for _, fut in send]
        errors = [p for p in mine if isinstance(p, Exception)]
        rest_prepared = prepared - len(send)
        if not any(live):
            return rest, rest_prepared
        if errors:
            inputs: Any = errors[0]
        else:
            inputs = _concat(mine)
            if not all(live):
                inputs = inputs[np.asarray(live)]
        self._idle.clear()
        self._handoff.put(([item for item, ok in zip(send, live) if ok], inputs))
        return rest, rest_prepared

    # --- runner -------------------------------------------------------------------

    def _run_loop(self) -> None:
        while (job := self._handoff.get()) is not None:
            batch, inputs = job
            try:
                self._run_batch(batch, inputs)
            finally:
                self._idle.set()
                self._queue.put(_WAKE)  # the collector may be blocked on the queue

    def _run_batch(self, batch: list[Item], inputs: Any) -> None:
        started = time.perf_counter()
        try:
            if isinstance(inputs, Exception):
                raise inputs
            out = self._encode(inputs)
        except Exception as exc:  # one bad batch must not kill the worker
            log.exception("inference failed for a batch of %d", len(batch))
            for _, fut in batch:
                fut.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        per_frame = elapsed / len(batch)
        self._per_frame = per_frame if self._per_frame <= 0 else (1 - _EWMA) * self._per_frame + _EWMA * per_frame
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        for i, (_, fut) in enumerate(batch):
            fut.set_result(out[i])
