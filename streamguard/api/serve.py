"""`streamguard serve`: the daemon. SIGTERM/SIGINT drain: no new tasks, each
running task ends with status 16 after its in-flight segment, everything is
stored, then the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from .app import create_app
from .envelope import ApiRunner
from ..config import Settings
from ..runtime import Runtime

log = logging.getLogger(__name__)


ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf'


def access_log(settings: Settings) -> dict[str, Any]:
    """Runner arguments for the access log (server.access_log): its own logger at
    INFO, so it shows whatever the process's log level; escaped like every line."""
    if not settings.server.access_log:
        return {"access_log": None}
    logger = logging.getLogger("streamguard.access")
    logger.setLevel(logging.INFO)
    return {"access_log": logger, "access_log_format": ACCESS_LOG_FORMAT}


async def serve(settings: Settings, model_dir: str | None = None) -> int:
    runtime = await Runtime.create(settings, model_dir)
    runner = ApiRunner(create_app(runtime), handle_signals=False, **access_log(settings))
    await runner.setup()
    host, port = settings.server.host, settings.server.port
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await runtime.close()
        print(f"streamguard: error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.warning("streamguard listening on http://%s:%s (data %s)", host, port, settings.data_dir)
    await stop.wait()
    log.warning("draining: %d task(s) finish their in-flight segment, %d job(s) stop to run again at the next "
                "start", len(runtime.streams.tasks), len(runtime.jobs.running))
    # the API stays up meanwhile, for status polling
    await asyncio.gather(runtime.streams.drain(), runtime.jobs.drain())
    await runner.cleanup()
    await runtime.close()
    log.warning("drained; exiting")
    return 0


def run(settings: Settings, model_dir: str | None = None) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(settings, model_dir))
    return uvloop.run(serve(settings, model_dir))
