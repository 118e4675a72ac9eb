"""The inference batcher shared by every pipeline in the process.

Back-pressure policy: none is dropped here. Frames wait in one FIFO queue; the
worker thread takes up to `max_batch` of them, waiting at most `max_wait` after
the first for more to arrive, and runs the encoder once for the stack. Callers
get a concurrent Future per frame, usable from threads and (wrapped) from
asyncio. Inference runs in this thread, never on the event loop; ONNX Runtime
releases the GIL while it runs.
"""

from __future__ import annotations

import logging
import collections
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], np.ndarray]


class InferenceBatcher:
    def __init__(self, encode: Encoder, *, max_batch: int = 32, max_wait: float = 0.02,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self._enqueued: collections.deque[float] = collections.deque()  # submit times, oldest first
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference-batcher", daemon=True)
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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _collect(self, first: tuple[np.ndarray, Future]) -> tuple[list[tuple[np.ndarray, Future]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stop = self._collect(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        for _ in batch:
            self._enqueued.popleft()
        live = [(img, fut) for img, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            out = self._encode(np.stack([img for img, _ in live]))
        except Exception as exc:  # one bad batch must not kill the worker
            log.exception("inference failed for a batch of %d", len(live))
            for _, fut in live:
                fut.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(len(live), elapsed)
        for i, (_, fut) in enumerate(live):
            fut.set_result(out[i])
