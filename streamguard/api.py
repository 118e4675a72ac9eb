"""HTTP API (CONTRACT §2): aiohttp application factory, routes, auth and the
one error envelope.

Routes are declared once in ROUTES; the app's router and /openapi.json are
both built from that table and from the msgspec schemas.
"""

from __future__ import annotations

import datetime as dt
import logging
import mimetypes
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web

from . import __version__
from .errors import InputInvalid, NotFound, StreamGuardError, Unauthorized, Unavailable, UnsupportedMediaType
from .addresses import validate_callback_url
from .runtime import Runtime
from .schemas import (EVENTS, Delivery, ErrorBody, ErrorEnvelope, FieldInvalid, Page, ProjectView, RecordPage,
                      StreamRequest, StreamStarted, StreamStartedData, StreamTask, Success, TaskCounters,
                      WebhookUpdate, WebhookView)
from .store import Store
from .store.sqlite import DeliveryRow, Principal, TaskRow

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)
PRINCIPAL = "streamguard.principal"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

mimetypes.add_type("application/vnd.apple.mpegurl", ".m3u8")
mimetypes.add_type("video/mp2t", ".ts")

_json = msgspec.json.Encoder()


def iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(dt.datetime.now(dt.timezone.utc).timestamp()) or ""


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(payload), status=status, content_type="application/json")


def ok(data: Any, status: int = 200) -> web.Response:
    return json_response(Success(data=data), status)


# --- errors: one envelope, produced here only ----------------------------------

_HTTP_CODES = {400: "STREAMGUARD_BAD_REQUEST", 401: "STREAMGUARD_UNAUTHORIZED", 404: "STREAMGUARD_NOT_FOUND",
               405: "STREAMGUARD_METHOD_NOT_ALLOWED", 413: "STREAMGUARD_PAYLOAD_TOO_LARGE",
               415: "STREAMGUARD_UNSUPPORTED_MEDIA_TYPE"}


def error_response(request: web.Request, status: int, code: str, message: str,
                   details: dict[str, Any] | None = None) -> web.Response:
    body = ErrorEnvelope(error=ErrorBody(code=code, message=message, details=details or {}),
                         timestamp=now_iso(), path=request.path)
    resp = json_response(body, status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="streamguard"'
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StreamGuardError as exc:
        return error_response(request, exc.http_status, exc.code, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 413 else "request body is too large"
        return error_response(request, exc.status, _HTTP_CODES.get(exc.status, f"STREAMGUARD_HTTP_{exc.status}"),
                              message)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "STREAMGUARD_INTERNAL", "internal error")


# --- auth --------------------------------------------------------------------

@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <api key>")
    runtime = request.app[RUNTIME]
    principal = await runtime.store(Store.authenticate, token.strip())
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


# --- request decoding ------------------------------------------------------------

def _constraint_message(struct: type, field: str) -> str | None:
    info = msgspec.inspect.type_info(struct)
    for f in getattr(info, "fields", ()):
        if f.name == field:
            t = f.type
            if isinstance(t, msgspec.inspect.Metadata):  # a description alongside the constraints
                t = t.type
            lo, hi = getattr(t, "ge", None), getattr(t, "le", None)
            if lo is not None and hi is not None:
                return f"{field} must be between {lo:g} and {hi:g}"
            shortest, longest = getattr(t, "min_length", None), getattr(t, "max_length", None)
            unit = "characters" if isinstance(t, msgspec.inspect.StrType) else "entries"
            if longest is not None:
                span = f"{shortest} to {longest}" if shortest else f"at most {longest}"
                return f"{field} must have {span} {unit}"
    return None


def friendly_validation(exc: msgspec.ValidationError, struct: type) -> InputInvalid:
    if isinstance(exc.__cause__, FieldInvalid):  # a schema rule beyond the types (schemas.py)
        return InputInvalid(str(exc.__cause__), details={"field": exc.__cause__.field})
    text = str(exc)
    m = re.search(r"at `\$\.(\w+)", text)
    field = m.group(1) if m else None
    if "missing required field" in text:
        name = re.search(r"`(\w+)`", text)
        return InputInvalid(f"{name.group(1) if name else 'a field'} is required", details={"reason": text})
    if field and ">=" in text or field and "<=" in text:
        message = _constraint_message(struct, field) or text
        return InputInvalid(message, details={"field": field, "reason": text})
    return InputInvalid(text, details={"field": field} if field else {})


async def decode_json(request: web.Request, struct: type) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {request.content_type or 'none'}")
    body = await request.read()
    try:
        return msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, struct) from None
    except msgspec.DecodeError as exc:
        raise InputInvalid(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InputInvalid("malformed JSON: the body is not valid UTF-8") from None
    except RecursionError:
        raise InputInvalid("malformed JSON: nested too deeply") from None


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputInvalid(f"{name} must be an integer", details={"field": name}) from None
    if not lo <= value <= hi:
        raise InputInvalid(f"{name} must be between {lo} and {hi}", details={"field": name})
    return value


# --- views ------------------------------------------------------------------------

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
        started_at=iso(row.started_at), stopped_at=iso(row.stopped_at))


# --- handlers ------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    """Liveness only: the process answers (even with a broken model or a full disk)."""
    return json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    """Readiness, one named check each: the model really loaded, the store
    writable, free disk above the floor, not draining. 503 names every failing one."""
    runtime = request.app[RUNTIME]
    writable = await runtime.store(Store.writable)
    disk_reason = runtime.disk.reason()
    checks = {"model_loaded": runtime.analyzer is not None, "store_writable": writable,
              "disk_free": disk_reason is None, "draining": runtime.streams.draining}
    reasons = [r for r in (runtime.model_error, None if writable else "the store is not writable",
                           disk_reason, "the node is draining" if runtime.streams.draining else None) if r]
    disk = {"free_bytes": runtime.disk.free_bytes(), "min_free_bytes": runtime.disk.min_free_bytes}
    if reasons:
        raise Unavailable(f"not ready: {'; '.join(reasons)}",
                          details={"checks": checks, "reasons": reasons, "disk": disk})
    return json_response({"status": "ready", "checks": checks, "disk": disk})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi())


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


STATES = ("starting", "running", "stopped")


def page_query(request: web.Request, filter_name: str, allowed: tuple[str, ...]) -> tuple[str | None, int, int]:
    """?<filter>=&page=&pageSize= of the list routes, validated."""
    value = request.query.get(filter_name) or None
    if value is not None and value not in allowed:
        raise InputInvalid(f"{filter_name} must be one of {', '.join(allowed)}", details={"field": filter_name})
    return value, query_int(request, "page", 1, 1, 1_000_000), query_int(request, "pageSize", 20, 1, 100)


async def list_streams(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    state, page, size = page_query(request, "state", STATES)
    rows, total = await runtime.store(Store.list_tasks, principal_of(request).project_id, "stream", state, page, size)
    return ok(Page(items=[stream_view(runtime, r) for r in rows], total=total, page=page, pageSize=size))


async def stream_records(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    row = await runtime.streams.get(principal_of(request), request.match_info["task_id"])
    after = query_int(request, "after", -1, -1, 2**31)
    limit = query_int(request, "limit", 100, 1, 1000)
    rows = await runtime.store(Store.records, row.id, after, limit)
    items = [msgspec.Raw(body) for _, body in rows]
    # null once a stopped task has nothing more to give; otherwise where to poll from next
    exhausted = row.state == "stopped" and len(rows) < limit
    next_after = None if exhausted else (rows[-1][0] if rows else after)
    return ok(RecordPage(items=items, next_after=next_after))


def project_view(project) -> ProjectView:
    return ProjectView(id=project.id, name=project.name, created_at=iso(project.created_at) or "",
                       webhook=WebhookView(url=project.webhook_url, secret=project.webhook_secret,
                                           events=project.webhook_events))


async def put_webhook(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    update = await decode_json(request, WebhookUpdate)
    unknown = sorted(set(update.events) - set(EVENTS))
    if unknown:
        raise InputInvalid(f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}",
                           details={"field": "events"})
    if update.url is not None:
        await validate_callback_url(update.url, "url", runtime.settings.delivery)
    project = await runtime.store(Store.set_webhook, principal_of(request).project_id, update.url, update.events)
    return ok(project_view(project))


async def rotate_secret(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    project = await runtime.store(Store.rotate_secret, principal_of(request).project_id,
                                  runtime.settings.delivery.secret_grace_seconds)
    return ok(project_view(project))


def delivery_view(row: DeliveryRow) -> Delivery:
    return Delivery(id=row.id, eventId=row.event_id, event=row.event, url=row.url, taskId=row.task_id,
                    status=row.status, attempts=row.attempts, lastStatusCode=row.last_status_code,
                    lastError=row.last_error, createdAt=iso(row.created_at) or "",
                    nextAttemptAt=iso(row.next_attempt_at) if row.status == "pending" else None,
                    deliveredAt=iso(row.delivered_at))


DELIVERY_STATES = ("pending", "delivered", "failed")


async def list_deliveries(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    status, page, size = page_query(request, "status", DELIVERY_STATES)
    rows, total = await runtime.store(Store.deliveries, principal_of(request).project_id, status, page, size)
    return ok(Page(items=[delivery_view(r) for r in rows], total=total, page=page, pageSize=size))


async def retry_delivery(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    row = await runtime.store(Store.retry_delivery, request.match_info["delivery_id"],
                              principal_of(request).project_id)
    if row is None:
        raise NotFound(f"delivery {request.match_info['delivery_id']} not found")
    runtime.delivery.wake()
    return ok(delivery_view(row))


async def get_project(request: web.Request) -> web.Response:
    project = await request.app[RUNTIME].store(Store.project, principal_of(request).project_id)
    if project is None:
        raise NotFound("project not found")
    return ok(project_view(project))


# --- the route table: router and OpenAPI from one place ------------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type | None = None
    response: type | None = None
    auth: bool = True
    status: int = 200


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, "Liveness", auth=False),
    Route("GET", "/readyz", readyz, "Readiness: model loaded, store writable, free disk above the floor, not draining", auth=False),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format)", auth=False),
    Route("GET", "/openapi.json", openapi, "This document", auth=False),
    Route("POST", "/v1/streams", start_stream, "Start moderating a live stream", StreamRequest, StreamStarted),
    Route("GET", "/v1/streams", list_streams, "List stream tasks (?state=&page=&pageSize=)", None, Page),
    Route("GET", "/v1/streams/{task_id}", get_stream, "A stream task's state and counters", None, StreamTask),
    Route("POST", "/v1/streams/{task_id}/stop", stop_stream, "Stop a stream task (final record 14)", None,
          StreamTask),
    Route("DELETE", "/v1/streams/{task_id}", stop_stream, "Stop a stream task (alias)", None, StreamTask),
    Route("GET", "/v1/streams/{task_id}/records", stream_records,
          "Stored per-segment records (?after=&limit=), in segment order", None, RecordPage),
    Route("GET", "/v1/project", get_project, "The caller's project and webhook settings", None, ProjectView),
    Route("PUT", "/v1/project/webhook", put_webhook, "Set the project webhook URL and subscribed events",
          WebhookUpdate, ProjectView),
    Route("POST", "/v1/project/webhook/rotate-secret", rotate_secret,
          "New signing secret; the old one keeps signing during the grace period", None, ProjectView),
    Route("GET", "/v1/deliveries", list_deliveries, "Deliveries of records and events (?status=&page=&pageSize=)",
          None, Page),
    Route("POST", "/v1/deliveries/{delivery_id}/retry", retry_delivery, "Send a delivery again", None, Delivery),
)


def build_openapi() -> dict[str, Any]:
    structs = {r.request for r in ROUTES if r.request} | {r.response for r in ROUTES if r.response}
    structs |= {ErrorEnvelope}
    (_, components) = msgspec.json.schema_components(sorted(structs, key=lambda t: t.__name__),
                                                     ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    error_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": f"{r.method.lower()}_{r.handler.__name__}"}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", r.path)]
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.request.__name__}"}}}}
        ok_schema: dict[str, Any] = {}
        if r.response is not None:
            ref = {"$ref": f"#/components/schemas/{r.response.__name__}"}
            ok_schema = ref if r.response is StreamStarted else {
                "type": "object", "properties": {"success": {"type": "boolean"}, "data": ref}}
        op["responses"] = {str(r.status): {"description": "success", "content": {
            "application/json": {"schema": ok_schema}}} if ok_schema else {"description": "success"},
            "default": {"description": "error", "content": {"application/json": {"schema": error_ref}}}}
        if r.auth:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "streamguard", "version": __version__,
                     "description": "Self-hosted live video moderation API."},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


async def _media_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/media/"):
        response.headers["Access-Control-Allow-Origin"] = "*"  # players on other origins (hls.js)
        if request.path.endswith(".m3u8"):
            response.headers["Cache-Control"] = "no-cache"  # live playlists change


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1 << 20)
    app[RUNTIME] = runtime
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    runtime.media_root.mkdir(parents=True, exist_ok=True)
    app.router.add_static("/media", runtime.media_root, show_index=False, follow_symlinks=False)
    app.on_response_prepare.append(_media_headers)
    return app
