"""Operator endpoints without auth: liveness, readiness, Prometheus metrics and
the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from .envelope import json_response
from .requests import OPENAPI, RUNTIME
from .. import __version__
from ..errors import Unavailable
from ..store import Store


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
    jobs = {"running": len(runtime.jobs.running), "concurrency": runtime.settings.jobs.concurrency}
    return json_response({"status": "ready", "checks": checks, "disk": disk, "jobs": jobs})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI]())
