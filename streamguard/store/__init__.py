"""The store: SQLite for one node, PostgreSQL for several (`storage.database_url`).

Both run the same Store methods (store/sqlite.py); `open_store` and
`open_async_store` pick the backend from the settings."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from .sqlite import AsyncStore, Store

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["AsyncStore", "Store", "open_store", "open_async_store", "store_errors", "is_shared"]


def _database_url(settings: "Settings") -> str:
    return settings.storage.database_url


def is_shared(settings: "Settings") -> bool:
    """Whether several nodes share this store (PostgreSQL): leases and claims are then real."""
    return bool(_database_url(settings))


def open_store(settings: "Settings") -> Store:
    """The synchronous store of these settings (the `keys` command, tests)."""
    if is_shared(settings):
        from .postgres import PgStore
        return PgStore(_database_url(settings))
    return Store(settings.data_dir / "streamguard.db")


async def open_async_store(settings: "Settings") -> Any:
    """The daemon's store: AsyncStore over SQLite, or PgAsyncStore over a pool."""
    if is_shared(settings):
        from .postgres import PgAsyncStore
        return await PgAsyncStore(_database_url(settings)).open()
    import asyncio
    path = settings.data_dir / "streamguard.db"
    return AsyncStore(await asyncio.get_running_loop().run_in_executor(None, Store, path))


def store_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the database failed (not a bug): either backend's."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)
