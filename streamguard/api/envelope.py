"""Replies: the success envelope, the one error envelope (produced here only),
the middleware that maps typed errors to it, and the runner whose connections
answer the HTTP parser's own refusals with it too."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..errors import StreamGuardError
from ..schemas import ErrorBody, ErrorEnvelope, Success, iso

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_json = msgspec.json.Encoder()


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
