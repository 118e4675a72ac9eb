"""Blocking work (PyAV ingests, model loads) awaited from the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[[], T], name: str) -> "asyncio.Future[T]":
    """Run blocking `fn` in its own daemon thread. Unlike an executor's
    workers, such a thread never holds up the process's exit after a stop
    signal (a source can stay silent), and an ingest that runs for minutes
    does not occupy the shared default executor."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:
            pass  # the loop is gone: nobody waits for this thread any more

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut
