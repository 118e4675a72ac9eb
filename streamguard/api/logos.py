"""/v1/logos: the project's logo gallery (CONTRACT §6). POST takes a
multipart form (`name` plus one or more `image` files) or JSON `{"name",
"inputUrl"}`; images follow the standalone endpoints' rules (recognised by
content, 20 MB, pixel limit)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aiohttp import web

from .envelope import ok
from .requests import RUNTIME, decode_form, decode_json, decode_query, principal_of
from ..inputs.upload import receive_multipart
from ..schemas import LogoAddRequest, LogoForm, LogoListQuery
from ..services.standalone import MAX_IMAGE_BYTES


async def add_logo(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    principal = principal_of(request)
    if request.content_type == "multipart/form-data":
        with tempfile.TemporaryDirectory(prefix="logo-", dir=runtime.settings.data_dir) as tmp:
            upload = await receive_multipart(request, Path(tmp), file_field="image", max_bytes=MAX_IMAGE_BYTES,
                                             max_files=runtime.settings.logos.max_images_per_logo)
            form = decode_form(upload.fields, LogoForm)
            images = [(p.read_bytes(), f"image[{i}]") for i, p in enumerate(upload.files)]
        return ok(await runtime.logos.add(principal, form.name, images), status=201)
    req = await decode_json(request, LogoAddRequest)
    return ok(await runtime.logos.add_from_url(principal, req.name, req.inputUrl), status=201)


async def list_logos(request: web.Request) -> web.Response:
    query = decode_query(request, LogoListQuery)
    return ok(await request.app[RUNTIME].logos.list(principal_of(request), query.page, query.pageSize))


async def get_logo(request: web.Request) -> web.Response:
    return ok(await request.app[RUNTIME].logos.get(principal_of(request), request.match_info["logo_id"]))


async def delete_logo(request: web.Request) -> web.Response:
    await request.app[RUNTIME].logos.delete(principal_of(request), request.match_info["logo_id"])
    return web.Response(status=204)
