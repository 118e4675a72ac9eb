"""/v1/deliveries: the project's webhook and callback deliveries, and retrying one."""

from __future__ import annotations

from aiohttp import web

from .envelope import iso, ok
from .requests import RUNTIME, decode_query, principal_of
from ..schemas import Delivery, DeliveryListQuery, Page
from ..store.sqlite import DeliveryRow


def delivery_view(row: DeliveryRow) -> Delivery:
    return Delivery(id=row.id, eventId=row.event_id, event=row.event, url=row.url, taskId=row.task_id,
                    status=row.status, attempts=row.attempts, lastStatusCode=row.last_status_code,
                    lastError=row.last_error, createdAt=iso(row.created_at) or "",
                    nextAttemptAt=iso(row.next_attempt_at) if row.status == "pending" else None,
                    deliveredAt=iso(row.delivered_at))


async def list_deliveries(request: web.Request) -> web.Response:
    query = decode_query(request, DeliveryListQuery)
    rows, total = await request.app[RUNTIME].deliveries.list_deliveries(principal_of(request), query)
    return ok(Page(items=[delivery_view(r) for r in rows], total=total, page=query.page, pageSize=query.pageSize))


async def retry_delivery(request: web.Request) -> web.Response:
    row = await request.app[RUNTIME].deliveries.retry(principal_of(request), request.match_info["delivery_id"])
    return ok(delivery_view(row))
