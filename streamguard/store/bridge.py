"""Synchronous store code over an asyncio driver, without threads.

The store's methods are plain functions (`Store.append_record(store, ...)`),
shared by SQLite (run on a store thread) and PostgreSQL. For PostgreSQL they
run in a greenlet on the event loop: each database call inside them hands its
coroutine (psycopg's async API) to `greenlet_spawn`, which awaits it on the
loop and switches back with the result. So the loop never blocks on the
database, and one set of store code serves both backends. The same technique
as SQLAlchemy's asyncio extension (`greenlet_spawn` / `await_only`).
"""

from __future__ import annotations

import sys
from typing import Any, Awaitable, Callable, TypeVar

import greenlet

T = TypeVar("T")


class _Bridge(greenlet.greenlet):
    """A greenlet that runs store code; `driver` is the one awaiting for it."""

    def __init__(self, fn: Callable[..., Any], driver: greenlet.greenlet) -> None:
        super().__init__(fn, driver)
        self.driver = driver
        self.gr_context = driver.gr_context  # contextvars (logging context, asyncio's) carry over


def await_only(awaitable: Awaitable[T]) -> T:
    """From store code running under `greenlet_spawn`: the awaitable's result."""
    current = greenlet.getcurrent()
    if not isinstance(current, _Bridge):
        raise RuntimeError("a PostgreSQL store call outside AsyncStore (use the synchronous store instead)")
    return current.driver.switch(awaitable)


async def greenlet_spawn(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)`, awaiting each awaitable it passes to `await_only`."""
    bridge = _Bridge(fn, greenlet.getcurrent())
    result: Any = bridge.switch(*args, **kwargs)
    while not bridge.dead:
        try:
            value = await result
        except BaseException:  # the store code sees the driver's error (or a cancellation) where it awaited
            result = bridge.throw(*sys.exc_info())
        else:
            result = bridge.switch(value)
    return result
