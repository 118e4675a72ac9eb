"""The runtime: everything one serving process owns (settings, store, model,
metrics, services), created once by the app factory and torn down with it.
The only place such state lives."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .analysis.analyzer import Analyzer, resolve_model_dir
from .config import Settings
from .services.deliveries import DeliveryService
from .delivery.worker import DeliveryWorker
from .media.retention import DiskSpace, MediaRetention
from .media.storage import LocalStorage, MediaStorage, StorageError, node_storage
from .metrics import Metrics
from .services.projects import ProjectService
from .secretbox import SecretBox
from .services.cluster import LeaseKeeper, Ownership
from .store import AsyncStore, Store, open_async_store
from .services.jobs import JobService
from .services.logos import LogoService
from .services.streams import StreamService

log = logging.getLogger(__name__)

RECORD_PURGE_INTERVAL = 3600.0


async def load_analyzer(settings: Settings, model_dir: str | None,
                        metrics: Metrics) -> tuple[Analyzer | None, str | None]:
    """The model, or why it could not be loaded: a broken bundle must not keep
    the node from serving (/healthz, /readyz with the reason, tasks that need
    no model)."""
    loop = asyncio.get_running_loop()
    path = resolve_model_dir(settings, model_dir)
    analyzer = None
    try:
        analyzer = await loop.run_in_executor(None, lambda: Analyzer.create(settings, path, metrics.on_batch,
                                                                            metrics.on_logo_regions))
        metrics.prompt_tokens.inc(await loop.run_in_executor(None, analyzer.prepare))  # the node's cost
    except Exception as exc:  # any failure of a bundle (manifest, ONNX, tokenizer) is reported the same way
        if analyzer is not None:
            analyzer.close()
        reason = f"model bundle {path} failed to load: {getattr(exc, 'message', None) or exc}"
        log.error("%s; serving without a model: /readyz answers 503 and tasks that moderate are refused", reason)
        return None, reason
    return analyzer, None


async def check_media_storage(storage: MediaStorage) -> None:
    """At start, off the event loop: say at once when the node's bucket
    cannot be used (credentials, bucket, endpoint), not at the first segment."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, storage.check)
        log.info("media storage: %s", storage.url(""))
    except StorageError as err:
        log.error("media storage (storage.media = %r) cannot be used: %s", storage.kind, err.message)


@dataclass
class Runtime:
    settings: Settings
    store: AsyncStore
    analyzer: Analyzer | None
    metrics: Metrics
    streams: StreamService
    delivery: DeliveryWorker
    projects: ProjectService
    deliveries: DeliveryService
    started_at: float
    disk: DiskSpace
    retention: MediaRetention
    jobs: JobService
    logos: LogoService
    model_error: str | None = None
    leases: LeaseKeeper | None = None  # several nodes on a shared store (services/cluster.py)
    _housekeeping: asyncio.Task | None = None
    _storage_check: asyncio.Task | None = None

    @property
    def public_url(self) -> str:
        return self.streams.public_url

    @classmethod
    async def create(cls, settings: Settings, model_dir: str | None = None) -> "Runtime":
        loop = asyncio.get_running_loop()
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        store = await open_async_store(settings)
        ownership = Ownership.of(settings)
        log.info("node %s: %s store", ownership.node, "shared PostgreSQL" if ownership.shared else "SQLite")
        metrics = Metrics()
        analyzer, model_error = await load_analyzer(settings, model_dir, metrics)
        disk = DiskSpace(data_dir, settings.storage.min_free_bytes)
        public = settings.server.public_url or f"http://{settings.server.host}:{settings.server.port}"
        storage = node_storage(settings.storage.media, settings.storage.s3, data_dir / "media", public)
        retention = MediaRetention(data_dir / "media", settings.storage.media_retention_hours * 3600, disk,
                                   mirror=storage if storage.kind != LocalStorage.kind else None)
        delivery = DeliveryWorker(store, settings.delivery, metrics, ownership.node if ownership.shared else None)
        delivery.start()
        logos = LogoService(settings, store, analyzer)
        await logos.start()
        streams = StreamService(settings, store, analyzer, metrics, public, delivery, disk=disk,
                                model_error=model_error, storage=storage, ownership=ownership,
                                logos=logos)
        secrets = await loop.run_in_executor(None, SecretBox.from_settings, settings)
        jobs = JobService(settings, store, analyzer, metrics, public, delivery, disk=disk, model_error=model_error,
                          secrets=secrets, ownership=ownership, logos=logos)
        leases = LeaseKeeper(settings, store, ownership, metrics, streams, jobs) if ownership.shared else None
        if leases is not None:
            await leases.heartbeat()  # this node is a placement target from now on
        resumed = await streams.resume_orphans()
        if resumed:
            log.warning("resumed %d task(s) left running by a previous process%s", resumed,
                        " or whose lease ran out" if ownership.shared else "")
        streams.start_shedder()
        if leases is not None:
            leases.start()
        swept = await jobs.sweep_work()
        if swept:
            log.warning("removed %d leftover job input folder(s) of ended jobs or interrupted uploads", swept)
        jobs.start()  # jobs a previous process left queued or running are picked up from the store
        runtime = cls(settings, store, analyzer, metrics, streams, delivery,
                      ProjectService(store, settings.delivery, settings.sources, secrets),
                      DeliveryService(store, delivery), time.time(),
                      disk, retention, jobs, logos, model_error, leases)
        runtime._housekeeping = asyncio.create_task(runtime._housekeeping_loop(), name="housekeeping")
        if storage.kind != LocalStorage.kind:
            runtime._storage_check = asyncio.create_task(check_media_storage(storage), name="storage-check")
        return runtime

    async def _housekeeping_loop(self) -> None:
        """Media retention every `storage.sweep_interval_seconds`, record
        retention hourly; a failing pass is logged and retried, never fatal."""
        last_purge = float("-inf")
        while True:
            try:
                await self.sweep_media()
                if time.monotonic() - last_purge >= RECORD_PURGE_INTERVAL:
                    await self.purge_records()
                    last_purge = time.monotonic()
            except Exception:
                log.exception("retention pass failed; retrying next interval")
            await asyncio.sleep(self.settings.storage.sweep_interval_seconds)

    async def sweep_media(self) -> None:
        running = list(self.streams.tasks)  # snapshot on the loop; the walk runs in a worker thread
        result = await asyncio.get_running_loop().run_in_executor(None, self.retention.sweep, running)
        if result.files_deleted or result.dirs_deleted:
            log.info("media retention: deleted %d segment file(s) and %d stopped task folder(s), %d bytes",
                     result.files_deleted, result.dirs_deleted, result.bytes_freed)
        self.metrics.media_deleted_bytes.inc(result.bytes_freed)
        self.metrics.disk_free_bytes.set(self.disk.free_bytes())

    async def purge_records(self) -> None:
        keep = self.settings.storage.retention_days * 86400
        purged = await self.store(Store.purge, time.time() - keep)
        if purged:
            log.info("retention: purged %d record(s) older than %g days", purged,
                     self.settings.storage.retention_days)

    async def close(self) -> None:
        for task in (self._housekeeping, self._storage_check):
            if task is not None:
                task.cancel()
        # Leases are renewed through the drain (tasks finish their segment
        # here, then are handed over); the keeper stops after it.
        await asyncio.gather(self.streams.drain(), self.jobs.drain())
        if self.leases is not None:
            await self.leases.close()
        await self.delivery.close()
        if self.analyzer is not None:
            self.analyzer.close()
        await self.store.aclose()

    @property
    def media_root(self) -> Path:
        return self.settings.data_dir / "media"
