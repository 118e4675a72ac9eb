"""HTTP API (CONTRACT §2): the route table, /openapi.json built from it, and
the application factory.

Routes are declared once in ROUTES; the app's router and /openapi.json are
both built from that table and from the msgspec schemas. The handlers live in
one module per resource (streams, project, deliveries, media, health); replies
and errors in envelope.py, auth and request decoding in requests.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from .deliveries import list_deliveries, retry_delivery
from .envelope import Handler, error_middleware
from .health import healthz, metrics, openapi, readyz
from .jobs import cancel_job, create_job, get_job, job_records, list_jobs, upload_job
from .media import media, media_headers
from .standalone import (categorize_image, categorize_video, get_categorization_job, get_moderation_job,
                         list_categorization_jobs, list_moderation_jobs, moderate_image, moderate_image_upload,
                         moderate_images, moderate_images_upload, moderate_video)
from .project import delete_storage, get_project, put_storage, put_webhook, rotate_secret
from .requests import OPENAPI, RUNTIME, auth_middleware
from .streams import get_stream, list_streams, start_stream, stop_stream, stream_records
from .. import __version__
from ..runtime import Runtime
from ..schemas import (CategorizationJob, CategorizeRequest, Delivery, DeliveryListQuery, ErrorEnvelope, Job,
                       JobListQuery, JobOptions, JobRequest, ModerateImageRequest, ModerateImagesRequest,
                       ModerateVideoRequest, ModerationJob, Page, ProjectView, RecordPage, RecordQuery, S3Config, SegmentRecord,
                       StandaloneJobQuery, StreamListQuery, StreamRequest, StreamStarted, StreamTask, WebhookUpdate)


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
    # multipart/form-data body instead of JSON: (file field, struct of the other form fields)
    form: tuple[str, Any] | None = None


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
    Route("POST", "/v1/jobs", create_job, "Submit a file job by URL (201, PENDING)", JobRequest, Job, status=201),
    Route("POST", "/v1/jobs/upload", upload_job,
          "Submit a file job by upload: multipart `video` plus POST /v1/jobs's fields as form values "
          "(arrays and objects JSON-encoded); 413 past jobs.upload_max_bytes", None, Job, status=201,
          form=("video", JobOptions)),
    Route("GET", "/v1/jobs", list_jobs, "List file jobs, newest first", None, Page[Job], JobListQuery),
    Route("GET", "/v1/jobs/{job_id}", get_job, "A file job", None, Job),
    Route("DELETE", "/v1/jobs/{job_id}", cancel_job, "Cancel a PENDING job (204; any other status 409)",
          status=204),
    Route("GET", "/v1/jobs/{job_id}/records", job_records,
          "A job's stored per-segment records after a segment_index, in segment order", None,
          RecordPage[SegmentRecord], RecordQuery),
    Route("GET", "/v1/project", get_project, "The caller's project and webhook settings", None, ProjectView),
    Route("PUT", "/v1/project/webhook", put_webhook, "Set the project webhook URL and subscribed events",
          WebhookUpdate, ProjectView),
    Route("POST", "/v1/project/webhook/rotate-secret", rotate_secret,
          "New signing secret; the old one keeps signing during the grace period", None, ProjectView),
    Route("PUT", "/v1/project/storage", put_storage,
          "Set the default S3 output of the project's jobs (s3Config's fields; secretKey is write-only)",
          S3Config, ProjectView),
    Route("DELETE", "/v1/project/storage", delete_storage,
          "Remove the default S3 output: jobs without an s3Config are served under /media again", None, ProjectView),
    Route("GET", "/v1/deliveries", list_deliveries, "Deliveries of records and events, newest first", None,
          Page[Delivery], DeliveryListQuery),
    Route("POST", "/v1/moderate/image", moderate_image, "Moderate one image by URL, synchronously",
          ModerateImageRequest, ModerationJob),
    Route("POST", "/v1/moderate/image/upload", moderate_image_upload,
          "Moderate one uploaded image (multipart `image`, 20 MB), synchronously", None, ModerationJob),
    Route("POST", "/v1/moderate/images", moderate_images, "Moderate 1-20 images by URL; each item fails on its own",
          ModerateImagesRequest, ModerationJob),
    Route("POST", "/v1/moderate/images/upload", moderate_images_upload,
          "Moderate 1-20 uploaded images (multipart `images`, repeated)", None, ModerationJob),
    Route("POST", "/v1/moderate/video", moderate_video,
          "Moderate a video by URL: maxFrames frames spread over its duration", ModerateVideoRequest, ModerationJob),
    Route("POST", "/v1/categorize/image", categorize_image, "Categorize an image by URL", CategorizeRequest,
          CategorizationJob),
    Route("POST", "/v1/categorize/video", categorize_video, "Categorize a video by URL (maxFrames spread)",
          CategorizeRequest, CategorizationJob),
    Route("GET", "/v1/moderate/jobs", list_moderation_jobs, "Standalone moderation jobs, newest first", None,
          Page[ModerationJob], StandaloneJobQuery),
    Route("GET", "/v1/moderate/jobs/{job_id}", get_moderation_job, "A standalone moderation job", None,
          ModerationJob),
    Route("GET", "/v1/categorize/jobs", list_categorization_jobs, "Categorization jobs, newest first", None,
          Page[CategorizationJob], StandaloneJobQuery),
    Route("GET", "/v1/categorize/jobs/{job_id}", get_categorization_job, "A categorization job", None,
          CategorizationJob),
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
        if r.form is not None:
            op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _form_schema(*r.form)}}}
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


def _form_schema(file_field: str, struct: Any) -> dict[str, Any]:
    """A multipart form: the file, and the struct's fields as form values (arrays
    and objects as JSON text, as requests.decode_form reads them)."""
    schema = msgspec.json.schema(struct)
    fields = schema["$defs"][schema["$ref"].rsplit("/", 1)[1]]["properties"]
    props: dict[str, Any] = {file_field: {"type": "string", "format": "binary"}}
    for name, prop in fields.items():
        options = [o for o in prop.get("anyOf", [prop]) if o != {"type": "null"}]
        one = options[0] if len(options) == 1 else prop
        if one.get("type") in ("array", "object"):
            props[name] = {"type": "string", "description": f"JSON-encoded {one['type']}"}
        else:
            props[name] = {k: v for k, v in one.items() if k != "default"}
    return {"type": "object", "required": [file_field], "properties": props}


def _success(r: Route) -> dict[str, Any]:
    if r.status == 204:
        return {"description": "done; no content"}
    if r.response is None:
        return {"description": "success", "content": {
            t: {"schema": {} if t == "application/json" else {"type": "string"}} for t in r.content_types}}
    (ref,), _ = msgspec.json.schema_components([r.response], ref_template="#/components/schemas/{name}")
    if r.response not in BARE_REPLIES:
        ref = {"type": "object", "required": ["success", "data"],
               "properties": {"success": {"const": True}, "data": ref}}
    return {"description": "success", "content": {"application/json": {"schema": ref}}}


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1 << 20)
    app[RUNTIME] = runtime
    app[OPENAPI] = build_openapi
    runtime.media_root.mkdir(parents=True, exist_ok=True)
    for r in ROUTES:
        if r.method == "GET":
            app.router.add_get(r.path, r.handler)  # and HEAD
        else:
            app.router.add_route(r.method, r.path, r.handler)
    app.on_response_prepare.append(media_headers)
    return app
