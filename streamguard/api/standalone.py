"""/v1/moderate/image: standalone, synchronous moderation of one image by URL."""

from __future__ import annotations

from aiohttp import web

from .envelope import ok
from .requests import RUNTIME, decode_json
from ..schemas import ModerateImageRequest
from ..services.standalone import StandaloneService


async def moderate_image(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    req = await decode_json(request, ModerateImageRequest)
    return ok(await StandaloneService(runtime.settings, runtime.analyzer).moderate_image(req))
