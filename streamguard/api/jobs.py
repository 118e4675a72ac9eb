"""/v1/jobs: submit file jobs (by URL or upload), inspect, list and cancel
them, and read their stored per-segment records."""

from __future__ import annotations

import asyncio
import shutil

from aiohttp import web

from .envelope import ok
from .requests import RUNTIME, decode_form, decode_json, decode_query, principal_of
from .streams import record_page
from ..inputs.upload import receive_multipart
from ..schemas import JobListQuery, JobOptions, JobRequest, Page, RecordQuery


async def create_job(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    req = await decode_json(request, JobRequest)
    row = await runtime.jobs.submit(principal_of(request), req)
    return ok(runtime.jobs.view(row), status=201)


async def upload_job(request: web.Request) -> web.Response:
    """The file streams to disk (413 past jobs.upload_max_bytes); the form
    fields are validated like POST /v1/jobs's body; nothing is kept if anything fails."""
    runtime = request.app[RUNTIME]
    principal = principal_of(request)
    await runtime.jobs.check_admission(principal)  # before a byte of the file is taken
    job_id, folder = runtime.jobs.upload_dir()
    try:
        upload = await receive_multipart(request, folder, file_field="video",
                                         max_bytes=runtime.settings.jobs.upload_max_bytes)
        opts = decode_form(upload.fields, JobOptions)
        row = await runtime.jobs.submit_upload(principal, opts, job_id, upload.files[0])
    except BaseException:
        await asyncio.get_running_loop().run_in_executor(None, lambda: shutil.rmtree(folder, ignore_errors=True))
        raise
    return ok(runtime.jobs.view(row), status=201)


async def get_job(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    row = await runtime.jobs.get(principal_of(request), request.match_info["job_id"])
    return ok(runtime.jobs.view(row))


async def list_jobs(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    query = decode_query(request, JobListQuery)
    rows, total = await runtime.jobs.list_jobs(principal_of(request), query)
    return ok(Page(items=[runtime.jobs.view(r) for r in rows], total=total, page=query.page,
                   pageSize=query.pageSize))


async def cancel_job(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    await runtime.jobs.cancel(principal_of(request), request.match_info["job_id"])
    return web.Response(status=204)


async def job_records(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    query = decode_query(request, RecordQuery)
    row, rows = await runtime.jobs.records(principal_of(request), request.match_info["job_id"], query)
    return ok(record_page(rows, query, ended=row.status in ("COMPLETED", "FAILED", "CANCELLED")))
