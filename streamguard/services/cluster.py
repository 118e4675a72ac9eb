"""Task ownership across nodes (CONTRACT §7): who runs what, and for how long.

Every live task and running file job is owned by one node through a lease
in the store (store/sqlite.py "cluster"). This node's `LeaseKeeper`, every
third of `cluster.lease_seconds`:
- heartbeats (the `nodes` row: alive, and its capacity, for placement);
- renews the leases of what it runs; one it no longer holds (another node
  took it over while this one was paused or cut off) stops here at once,
  writing nothing more for it (its writes would be refused anyway: each
  names the epoch of its claim);
- claims, as far as its free capacity goes, live tasks assigned to it or
  whose lease ran out (a dead node's), and continues them through the same
  resume path a restarted node uses (next segment_index, continuous timeline).
File jobs are claimed by the job dispatcher (services/jobs.py) the same way.

A single node on SQLite owns everything: no keeper runs, leases never lapse,
and a restart resumes whatever the previous process left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Settings
from ..metrics import Metrics
from ..store import AsyncStore, Store, is_shared
from ..store.sqlite import Claimant

if TYPE_CHECKING:
    from .jobs import JobService
    from .streams import StreamService

log = logging.getLogger(__name__)


@dataclass
class Ownership:
    """This node's identity and lease settings, shared by the services that claim work."""

    node: str
    shared: bool  # several nodes share the store: leases are real
    lease_seconds: float
    # monotonic time the last successful renewal was sent (its leases run from then)
    renewed_at: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, settings: Settings) -> "Ownership":
        return cls(settings.node_id, is_shared(settings), settings.cluster.lease_seconds)

    def claimant(self) -> Claimant:
        now = time.time()
        return Claimant(self.node, now, now + self.lease_seconds, any_owner=not self.shared)

    def fresh(self) -> bool:
        """Whether this node's leases may still be its own: false once a whole
        lease has passed since the last renewal went through (the node was
        paused, or cannot reach the database). Live media is not written then:
        another node may be writing that task's segments."""
        return not self.shared or time.monotonic() - self.renewed_at < self.lease_seconds


class LeaseKeeper:
    def __init__(self, settings: Settings, store: AsyncStore, ownership: Ownership, metrics: Metrics,
                 streams: "StreamService", jobs: "JobService") -> None:
        self.settings = settings
        self.store = store
        self.ownership = ownership
        self.metrics = metrics
        self.streams = streams
        self.jobs = jobs
        self._loop: asyncio.Task | None = None

    @property
    def interval(self) -> float:
        return self.ownership.lease_seconds / 3

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="leases")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.tick()
            except Exception as exc:  # the database is unreachable: leases lapse, writes get refused
                log.warning("lease renewal failed: %s", exc)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    async def heartbeat(self) -> None:
        await self.store(Store.heartbeat, self.ownership.node, self.settings.limits.max_tasks,
                         self.settings.jobs.concurrency, time.time())

    async def tick(self) -> int:
        """One round: heartbeat, renew, drop what was lost, claim what is free. Returns the tasks taken."""
        own = self.ownership
        await self.heartbeat()
        held = {**self.streams.held(), **self.jobs.held()}
        sent = time.monotonic()
        kept = await self.store(Store.renew_leases, own.node, sorted(held), time.time() + own.lease_seconds)
        lost = [task_id for task_id, epoch in held.items() if kept.get(task_id) != epoch]
        if lost:
            self.streams.lost(lost)
            self.jobs.lost(lost)
        own.renewed_at = sent  # after the lost ones stopped: their media must not be written meanwhile
        return await self.streams.take_over()
