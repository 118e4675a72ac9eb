"""/v1/streams: start, stop, inspect and list live stream tasks, and read their
stored records."""

from __future__ import annotations

import msgspec
from aiohttp import web

from .envelope import iso, json_response, ok
from .requests import RUNTIME, decode_json, decode_query, principal_of
from ..runtime import Runtime
from ..schemas import (AlertItem, AlertPage, AlertQuery, Page, RecordPage, RecordQuery, StreamListQuery, StreamRequest, StreamStarted,
                       StreamStartedData, StreamTask, TaskCounters)
from ..store.sqlite import TaskRow


def stream_view(runtime: Runtime, row: TaskRow) -> StreamTask:
    params = dict(row.params)
    metadata = params.pop("metadata", None)
    params.pop("url", None)
    return StreamTask(
        task_id=row.id, state=row.state, status=row.final_status, message=row.final_message, url=row.url,
        playlist_url=runtime.streams.playlist_url(row.id),
        counters=TaskCounters(segments=row.segments, flagged_segments=row.flagged_segments, tokens=row.tokens,
                              reconnects=row.reconnects),
        settings=params, metadata=metadata, created_at=iso(row.created_at) or "",
        started_at=iso(row.started_at), stopped_at=iso(row.stopped_at), node=row.node)


async def start_stream(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    req = await decode_json(request, StreamRequest)
    row = await runtime.streams.start(principal_of(request), req)
    return json_response(StreamStarted(data=StreamStartedData(task_id=row.id)))


async def stop_stream(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    row = await runtime.streams.stop(principal_of(request), request.match_info["task_id"])
    return ok(stream_view(runtime, row))


async def get_stream(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    row = await runtime.streams.get(principal_of(request), request.match_info["task_id"])
    return ok(stream_view(runtime, row))


async def list_streams(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    query = decode_query(request, StreamListQuery)
    rows, total = await runtime.streams.list_tasks(principal_of(request), query)
    return ok(Page(items=[stream_view(runtime, r) for r in rows], total=total, page=query.page,
                   pageSize=query.pageSize))


async def stream_records(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    query = decode_query(request, RecordQuery)
    row, rows = await runtime.streams.records(principal_of(request), request.match_info["task_id"], query)
    return ok(record_page(rows, query, ended=row.state == "stopped"))


def record_page(rows: list[tuple[int, bytes]], query: RecordQuery, *, ended: bool) -> RecordPage:
    """Stored records as sent; next_after is null once an ended task or job
    has nothing more to give, otherwise where to poll from next."""
    exhausted = ended and len(rows) < query.limit
    next_after = None if exhausted else (rows[-1][0] if rows else query.after)
    return RecordPage(items=[msgspec.Raw(body) for _, body in rows], next_after=next_after)


async def list_alerts(request: web.Request) -> web.Response:
    """GET /v1/alerts: the project's alerts after a cursor (the console polls it)."""
    return await _alerts(request, None)


async def stream_alerts(request: web.Request) -> web.Response:
    return await _alerts(request, request.match_info["task_id"])


async def _alerts(request: web.Request, task_id: str | None) -> web.Response:
    query = decode_query(request, AlertQuery)
    rows = await request.app[RUNTIME].streams.alerts(principal_of(request), task_id, query)
    items = [AlertItem(alert_index=n, eventId=event_id, created_at=iso(created) or "",
                       **msgspec.json.decode(data)) for n, event_id, data, created in rows]
    return ok(AlertPage(items=items, next_after=rows[-1][0] if rows else query.after))
