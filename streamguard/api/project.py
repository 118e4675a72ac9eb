"""/v1/project: the caller's project, its webhook settings and its jobs' default S3 output."""

from __future__ import annotations

from aiohttp import web

from .envelope import iso, ok
from .requests import RUNTIME, decode_json, principal_of
from ..schemas import ProjectView, S3Config, WebhookUpdate, WebhookView
from ..services import outputs
from ..store.sqlite import Project


def project_view(project: Project) -> ProjectView:
    return ProjectView(id=project.id, name=project.name, created_at=iso(project.created_at) or "",
                       webhook=WebhookView(url=project.webhook_url, secret=project.webhook_secret,
                                           events=project.webhook_events),
                       storage=outputs.view(project.storage))


async def get_project(request: web.Request) -> web.Response:
    return ok(project_view(await request.app[RUNTIME].projects.get(principal_of(request))))


async def put_webhook(request: web.Request) -> web.Response:
    update = await decode_json(request, WebhookUpdate)
    return ok(project_view(await request.app[RUNTIME].projects.set_webhook(principal_of(request), update)))


async def rotate_secret(request: web.Request) -> web.Response:
    return ok(project_view(await request.app[RUNTIME].projects.rotate_secret(principal_of(request))))


async def put_storage(request: web.Request) -> web.Response:
    config = await decode_json(request, S3Config)
    return ok(project_view(await request.app[RUNTIME].projects.set_storage(principal_of(request), config)))


async def delete_storage(request: web.Request) -> web.Response:
    return ok(project_view(await request.app[RUNTIME].projects.clear_storage(principal_of(request))))
