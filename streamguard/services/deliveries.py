"""Deliveries as the API sees them: a project's outbox rows, listed and
retried. The HTTP layer talks to this service, never to the store."""

from __future__ import annotations

from ..delivery.worker import DeliveryWorker
from ..errors import NotFound
from ..schemas import DeliveryListQuery
from ..store import AsyncStore, Store
from ..store.sqlite import DeliveryRow, Principal


class DeliveryService:
    def __init__(self, store: AsyncStore, worker: DeliveryWorker) -> None:
        self.store = store
        self.worker = worker

    async def list_deliveries(self, principal: Principal, query: DeliveryListQuery) -> tuple[list[DeliveryRow], int]:
        return await self.store(Store.deliveries, principal.project_id, query.status or None, query.page,
                                query.pageSize)

    async def retry(self, principal: Principal, delivery_id: str) -> DeliveryRow:
        """Send a delivery again (failed ones included), from a fresh attempt count."""
        row = await self.store(Store.retry_delivery, delivery_id, principal.project_id)
        if row is None:
            raise NotFound(f"delivery {delivery_id} not found")
        self.worker.wake()
        return row
