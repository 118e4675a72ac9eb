"""The runtime: everything one serving process owns (settings, store, model,
metrics, services), created once by the app factory and torn down with it.
The only place such state lives."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .analysis import Analyzer, resolve_model_dir
from .config import Settings
from .deliveries import DeliveryService
from .delivery import DeliveryWorker
from .metrics import Metrics
from .projects import ProjectService
from .store import AsyncStore, Store
from .streams import StreamService

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: AsyncStore
    analyzer: Analyzer
    metrics: Metrics
    streams: StreamService
    delivery: DeliveryWorker
    projects: ProjectService
    deliveries: DeliveryService
    started_at: float
    _retention: asyncio.Task | None = None

    @property
    def public_url(self) -> str:
        return self.streams.public_url

    @classmethod
    async def create(cls, settings: Settings, model_dir: str | None = None) -> "Runtime":
        loop = asyncio.get_running_loop()
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        store = AsyncStore(await loop.run_in_executor(None, Store, data_dir / "streamguard.db"))
        metrics = Metrics()
        analyzer = await loop.run_in_executor(
            None, lambda: Analyzer.create(settings, resolve_model_dir(settings, model_dir), metrics.on_batch))
        await loop.run_in_executor(None, analyzer.prepare)
        public = settings.server.public_url or f"http://{settings.server.host}:{settings.server.port}"
        delivery = DeliveryWorker(store, settings.delivery, metrics)
        delivery.start()
        streams = StreamService(settings, store, analyzer, metrics, public, delivery)
        resumed = await streams.resume_orphans()
        if resumed:
            log.warning("resumed %d task(s) left running by a previous process", resumed)
        streams.start_shedder()
        runtime = cls(settings, store, analyzer, metrics, streams, delivery,
                      ProjectService(store, settings.delivery), DeliveryService(store, delivery), time.time())
        runtime._retention = asyncio.create_task(runtime._retention_loop(), name="retention")
        return runtime

    async def _retention_loop(self, interval: float = 3600.0) -> None:
        keep = self.settings.storage.retention_days * 86400
        while True:
            purged = await self.store(Store.purge, time.time() - keep)
            if purged:
                log.info("retention: purged %d record(s) older than %g days", purged,
                         self.settings.storage.retention_days)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        self._retention.cancel()
        await self.streams.drain()
        await self.delivery.close()
        self.analyzer.close()
        self.store.close()

    @property
    def media_root(self) -> Path:
        return self.settings.data_dir / "media"
