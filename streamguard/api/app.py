"""HTTP API (CONTRACT §2): aiohttp application factory, routes, auth and the
one error envelope.

Routes are declared once in ROUTES; the app's router and /openapi.json are
both built from that table and from the msgspec schemas.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .. import __version__
from ..errors import InputInvalid, NotFound, StreamGuardError, Unauthorized, Unavailable, UnsupportedMediaType
from ..addresses import validate_callback_url
from ..runtime import Runtime
from ..schemas import (Delivery, DeliveryListQuery, ErrorBody, ErrorEnvelope, FieldInvalid, Page, ProjectView,
                      RecordPage, RecordQuery, SegmentRecord, StreamListQuery, StreamRequest, StreamStarted,
                      StreamStartedData, StreamTask, Success, TaskCounters, WebhookUpdate, WebhookView)
from ..store import Store
from ..store.sqlite import DeliveryRow, Principal, Project, TaskRow

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
               415: "STREAMGUARD_UNSUPPORTED_MEDIA_TYPE", 431: "STREAMGUARD_HEADERS_TOO_LARGE"}


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
        resp = error_response(request, exc.status, _HTTP_CODES.get(exc.status, f"STREAMGUARD_HTTP_{exc.status}"),
                              message)
        if "Allow" in exc.headers:  # 405: the methods the resource does take (RFC 9110 §15.5.6)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "STREAMGUARD_INTERNAL", "internal error")


# --- errors the HTTP parser finds, before any route or middleware runs ---------------------

def parser_error(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request aiohttp's parser refused. The message
    never quotes the request: the offending bytes may hold a credential."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
        limit = exc.args[1] if isinstance(exc, LineTooLong) else None
        size = f"longer than {limit} bytes" if isinstance(limit, int) else "too large"
        return 431, "STREAMGUARD_HEADERS_TOO_LARGE", f"the request line or a header field is {size}"
    if status >= 500:
        return 500, "STREAMGUARD_INTERNAL", "internal error"
    reason = type(exc).__name__ if exc is not None else "unreadable"
    return status, _HTTP_CODES.get(status, f"STREAMGUARD_HTTP_{status}"), f"malformed HTTP request ({reason})"


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests its parser refuses (oversized
    headers, bad request lines ...) with the error envelope instead of plain text,
    and logging them without the request's bytes (no traceback quoting a header)."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        status, code, text = parser_error(status, exc)
        if status >= 500:
            self.log_exception("error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.info("refused a request from %s: %s %s", request.remote, status, text)
        if request.writer.output_size > 0:  # a reply was under way: the connection is all we can close
            raise ConnectionError("response already started; cannot send the error envelope")
        resp = error_response(request, status, code, text)
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """AppRunner whose connections use EnvelopeRequestHandler (aiohttp has no public
    hook for the parser's error replies)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer
        return server


# --- auth --------------------------------------------------------------------

@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <api key>")
    principal = await request.app[RUNTIME].projects.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


# --- request decoding ------------------------------------------------------------

def _field_info(struct: type, field: str) -> tuple[Any, Any, dict[str, Any]]:
    """A struct field's msgspec type unwrapped from metadata and `| None`, its
    item type (the same for non-lists) and its JSON-schema extras (e.g. the
    description)."""
    info = msgspec.inspect.type_info(struct)
    t: Any = next((f.type for f in getattr(info, "fields", ()) if f.name == field), None)
    extra: dict[str, Any] = {}
    while True:
        if isinstance(t, msgspec.inspect.Metadata):
            extra, t = {**extra, **(t.extra_json_schema or {})}, t.type
        elif isinstance(t, msgspec.inspect.UnionType):
            t = next((u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)), None)
        else:
            break
    item = t.item_type if isinstance(t, msgspec.inspect.ListType) else t
    while isinstance(item, msgspec.inspect.Metadata):
        extra, item = {**extra, **(item.extra_json_schema or {})}, item.type
    return t, item, extra


def _constraint_message(struct: type, field: str, text: str) -> str | None:
    """A message in the API's words for a range, length, choice or pattern violation."""
    t, item, extra = _field_info(struct, field)
    lo, hi = getattr(item, "ge", None), getattr(item, "le", None)
    if lo is not None and hi is not None and (">=" in text or "<=" in text):
        return f"{field} must be between {lo:g} and {hi:g}"
    shortest, longest = getattr(t, "min_length", None), getattr(t, "max_length", None)
    if longest is not None and "length" in text:
        unit = "characters" if isinstance(t, msgspec.inspect.StrType) else "entries"
        span = f"{shortest} to {longest}" if shortest else f"at most {longest}"
        return f"{field} must have {span} {unit}"
    if isinstance(item, msgspec.inspect.LiteralType) and "Invalid enum value" in text:
        return f"{field} must be one of {', '.join(map(str, item.values))}"
    if "matching regex" in text and "description" in extra:
        return f"{field} must be {extra['description']}"
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
    message = _constraint_message(struct, field, text) if field else None
    if message:
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


def decode_query(request: web.Request, struct: type) -> Any:
    """The query string as `struct` (see schemas: the same struct documents it in
    /openapi.json). Unknown names are ignored; of a repeated name the last counts."""
    values = dict(request.query.items())
    try:
        return msgspec.convert(values, struct, strict=False)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, struct) from None


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
    items = [msgspec.Raw(body) for _, body in rows]
    # null once a stopped task has nothing more to give; otherwise where to poll from next
    exhausted = row.state == "stopped" and len(rows) < query.limit
    next_after = None if exhausted else (rows[-1][0] if rows else query.after)
    return ok(RecordPage(items=items, next_after=next_after))


def project_view(project: Project) -> ProjectView:
    return ProjectView(id=project.id, name=project.name, created_at=iso(project.created_at) or "",
                       webhook=WebhookView(url=project.webhook_url, secret=project.webhook_secret,
                                           events=project.webhook_events))


async def get_project(request: web.Request) -> web.Response:
    return ok(project_view(await request.app[RUNTIME].projects.get(principal_of(request))))


async def put_webhook(request: web.Request) -> web.Response:
    update = await decode_json(request, WebhookUpdate)
    return ok(project_view(await request.app[RUNTIME].projects.set_webhook(principal_of(request), update)))


async def rotate_secret(request: web.Request) -> web.Response:
    return ok(project_view(await request.app[RUNTIME].projects.rotate_secret(principal_of(request))))


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


async def media(request: web.Request) -> web.StreamResponse:
    """A file the daemon wrote under the media root (segments, playlists, thumbnails)."""
    name = request.match_info["path"]
    root = request.app[RUNTIME].media_root
    path = await asyncio.get_running_loop().run_in_executor(None, media_file, root, name)
    if path is None:
        raise NotFound(f"no media file {name}")
    return web.FileResponse(path)


def media_file(root: Path, name: str) -> Path | None:
    """The regular file `name` names under `root`, or None: nothing outside the root,
    no directories, no symlinks out of it."""
    if PurePosixPath(name).is_absolute():
        return None
    base = root.resolve()
    try:
        path = (base / name).resolve()
    except (OSError, RuntimeError):  # symlink loops
        return None
    return path if path.is_relative_to(base) and path.is_file() else None


# --- the route table: router and OpenAPI from one place ------------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp syntax; a {name:regex} segment is documented as {name}
    handler: Handler
    summary: str
    request: Any = None  # JSON body struct
    response: Any = None  # struct of `data` in the success envelope (or the whole reply, see BARE_REPLIES)
    query: Any = None  # query string struct, decoded by the handler with decode_query
    auth: bool = True
    status: int = 200
    content_types: tuple[str, ...] = ("application/json",)  # of the success reply


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, "Liveness", auth=False),
    Route("GET", "/readyz", readyz, "Readiness: model loaded, store writable, free disk above the floor, not draining", auth=False),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format)", auth=False,
          content_types=("text/plain",)),
    Route("GET", "/openapi.json", openapi, "This document", auth=False),
    Route("GET", "/media/{path:.+}", media, "HLS playlists, segments and thumbnails the daemon wrote",
          auth=False, content_types=("application/vnd.apple.mpegurl", "video/mp2t", "image/jpeg")),
    Route("POST", "/v1/streams", start_stream, "Start moderating a live stream", StreamRequest, StreamStarted),
    Route("GET", "/v1/streams", list_streams, "List stream tasks, newest first", None, Page[StreamTask],
          StreamListQuery),
    Route("GET", "/v1/streams/{task_id}", get_stream, "A stream task's state and counters", None, StreamTask),
    Route("POST", "/v1/streams/{task_id}/stop", stop_stream, "Stop a stream task (final record 14)", None,
          StreamTask),
    Route("DELETE", "/v1/streams/{task_id}", stop_stream, "Stop a stream task (alias)", None, StreamTask),
    Route("GET", "/v1/streams/{task_id}/records", stream_records,
          "Stored per-segment records after a segment_index, in segment order", None, RecordPage[SegmentRecord],
          RecordQuery),
    Route("GET", "/v1/project", get_project, "The caller's project and webhook settings", None, ProjectView),
    Route("PUT", "/v1/project/webhook", put_webhook, "Set the project webhook URL and subscribed events",
          WebhookUpdate, ProjectView),
    Route("POST", "/v1/project/webhook/rotate-secret", rotate_secret,
          "New signing secret; the old one keeps signing during the grace period", None, ProjectView),
    Route("GET", "/v1/deliveries", list_deliveries, "Deliveries of records and events, newest first", None,
          Page[Delivery], DeliveryListQuery),
    Route("POST", "/v1/deliveries/{delivery_id}/retry", retry_delivery, "Send a delivery again", None, Delivery),
)

# Replies sent as they are, not inside {"success": true, "data": ...} (the reference's shape).
BARE_REPLIES = (StreamStarted,)


def doc_path(path: str) -> str:
    return re.sub(r"{(\w+):[^}]+}", r"{\1}", path)


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAPI query parameters from a query struct's JSON schema (its own declaration)."""
    params = []
    for name, prop in schema["properties"].items():
        options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
        if options:  # `X | None = None`: optional in a query string, never null
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **options[0]} if len(options) == 1 \
                else {**prop, "anyOf": options}
        if prop.get("default", 0) is None:
            prop = {k: v for k, v in prop.items() if k != "default"}
        params.append({"name": name, "in": "query", "required": name in schema.get("required", ()),
                       "schema": prop, **({"description": prop["description"]} if "description" in prop else {})})
    return params


def build_openapi() -> dict[str, Any]:
    types: list[Any] = [ErrorEnvelope]
    for r in ROUTES:
        types += [t for t in (r.request, r.response, r.query) if t is not None]
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref_of = {id(t): ref for t, ref in zip(types, refs)}
    query_names = {ref_of[id(r.query)]["$ref"].rsplit("/", 1)[1] for r in ROUTES if r.query is not None}
    error = {"description": "error (the error envelope)",
             "content": {"application/json": {"schema": ref_of[id(ErrorEnvelope)]}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": f"{r.method.lower()}_{r.handler.__name__}"}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for p in re.findall(r"{(\w+)", r.path)]
        if r.query is not None:
            params += _query_parameters(components[ref_of[id(r.query)]["$ref"].rsplit("/", 1)[1]])
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref_of[id(r.request)]}}}
        op["responses"] = {str(r.status): _success(r), "default": error}
        if r.auth:
            op["security"] = [{"bearer": []}]
        paths.setdefault(doc_path(r.path), {})[r.method.lower()] = op
    for name in query_names:  # documented as parameters, not as bodies
        del components[name]
    return {"openapi": "3.1.0",
            "info": {"title": "streamguard", "version": __version__,
                     "description": "Self-hosted live video moderation API."},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def _success(r: Route) -> dict[str, Any]:
    if r.response is None:
        return {"description": "success", "content": {
            t: {"schema": {} if t == "application/json" else {"type": "string"}} for t in r.content_types}}
    (ref,), _ = msgspec.json.schema_components([r.response], ref_template="#/components/schemas/{name}")
    if r.response not in BARE_REPLIES:
        ref = {"type": "object", "required": ["success", "data"],
               "properties": {"success": {"const": True}, "data": ref}}
    return {"description": "success", "content": {"application/json": {"schema": ref}}}


async def _media_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/media/"):
        response.headers["Access-Control-Allow-Origin"] = "*"  # players on other origins (hls.js)
        if request.path.endswith(".m3u8"):
            response.headers["Cache-Control"] = "no-cache"  # live playlists change


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1 << 20)
    app[RUNTIME] = runtime
    runtime.media_root.mkdir(parents=True, exist_ok=True)
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler)  # and HEAD
        else:
            app.router.add_route(r.method, r.path, r.handler)
    app.on_response_prepare.append(_media_headers)
    return app
