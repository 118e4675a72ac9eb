"""/v1/moderate/* and /v1/categorize/*: standalone, synchronous moderation and
categorization of images and videos (CONTRACT §2). Each replies with the
completed job."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .envelope import ok
from .requests import RUNTIME, decode_json, decode_query, friendly_validation, principal_of
from ..errors import InputInvalid
from ..inputs.upload import receive_multipart
from ..schemas import (MAX_BATCH_IMAGES, Page, StandaloneJobQuery, CategorizeRequest, ModerateImageRequest, ModerateImagesRequest,
                       ModerateVideoRequest, _Moderate)
from ..services.standalone import MAX_IMAGE_BYTES, StandaloneService

STILL = 1  # a still image is one frame; an animation is spread over this many at most
ANIMATION_FRAMES = 8


def _service(request: web.Request) -> StandaloneService:
    runtime = request.app[RUNTIME]
    return StandaloneService(runtime.settings, runtime.analyzer, runtime.store, runtime.delivery)


async def moderate_image(request: web.Request) -> web.Response:
    req = await decode_json(request, ModerateImageRequest)
    svc = _service(request)
    return ok(await svc.moderate_single(principal_of(request), req, "image", req.inputUrl, svc.image_from_url(req.inputUrl, ANIMATION_FRAMES)))


async def moderate_images(request: web.Request) -> web.Response:
    req = await decode_json(request, ModerateImagesRequest)
    svc = _service(request)
    inputs = [(u, svc.image_from_url(u, ANIMATION_FRAMES, f"inputUrls[{i}]")) for i, u in enumerate(req.inputUrls)]
    return ok(await svc.moderate_batch(principal_of(request), req, inputs))


async def moderate_video(request: web.Request) -> web.Response:
    req = await decode_json(request, ModerateVideoRequest)
    svc = _service(request)
    return ok(await svc.moderate_single(principal_of(request), req, "video", req.inputUrl, svc.video_from_url(req.inputUrl, req.maxFrames)))


def _form_options(fields: dict[str, str]) -> _Moderate:
    """threshold / thresholds / metadata sent as form values next to the files."""
    values: dict[str, Any] = {}
    for name in ("threshold", "thresholds", "metadata"):
        if name in fields:
            try:
                values[name] = msgspec.json.decode(fields[name])
            except msgspec.DecodeError:
                raise InputInvalid(f"{name} must be JSON", details={"field": name}) from None
    try:
        return msgspec.convert(values, _Moderate)
    except msgspec.ValidationError as exc:
        raise friendly_validation(exc, _Moderate) from None


async def _uploaded(request: web.Request, field: str, max_files: int, tmp: str) -> tuple[list[bytes], _Moderate]:
    upload = await receive_multipart(request, Path(tmp), file_field=field, max_bytes=MAX_IMAGE_BYTES,
                                     max_files=max_files)
    return [p.read_bytes() for p in upload.files], _form_options(upload.fields)


async def moderate_image_upload(request: web.Request) -> web.Response:
    svc = _service(request)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=request.app[RUNTIME].settings.data_dir) as tmp:
        (data, *_), opts = await _uploaded(request, "image", 1, tmp)
    return ok(await svc.moderate_single(principal_of(request), opts, "image", None, svc.image_from_bytes(data, ANIMATION_FRAMES, "image")))


async def moderate_images_upload(request: web.Request) -> web.Response:
    svc = _service(request)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=request.app[RUNTIME].settings.data_dir) as tmp:
        files, opts = await _uploaded(request, "images", MAX_BATCH_IMAGES, tmp)
    inputs = [(None, svc.image_from_bytes(d, ANIMATION_FRAMES, f"images[{i}]")) for i, d in enumerate(files)]
    return ok(await svc.moderate_batch(principal_of(request), opts, inputs))


async def categorize_image(request: web.Request) -> web.Response:
    req = await decode_json(request, CategorizeRequest)
    svc = _service(request)
    return ok(await svc.categorize(principal_of(request), req, "image", svc.image_from_url(req.inputUrl, req.maxFrames)))


async def categorize_video(request: web.Request) -> web.Response:
    req = await decode_json(request, CategorizeRequest)
    svc = _service(request)
    return ok(await svc.categorize(principal_of(request), req, "video", svc.video_from_url(req.inputUrl, req.maxFrames)))


def _jobs(kind: str):
    async def list_jobs(request: web.Request) -> web.Response:
        query = decode_query(request, StandaloneJobQuery)
        items, total = await _service(request).list(principal_of(request), kind, query)
        return ok(Page(items=items, total=total, page=query.page, pageSize=query.pageSize))

    async def get_job(request: web.Request) -> web.Response:
        return ok(await _service(request).get(principal_of(request), kind, request.match_info["job_id"]))

    return list_jobs, get_job


list_moderation_jobs, get_moderation_job = _jobs("moderation")
list_categorization_jobs, get_categorization_job = _jobs("categorization")
