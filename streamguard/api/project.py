"""/v1/project: the caller's project and its webhook settings."""

from __future__ import annotations

from aiohttp import web

from .envelope import iso, ok
from .requests import RUNTIME, decode_json, principal_of
from ..schemas import ProjectView, WebhookUpdate, WebhookView
from ..store.sqlite import Project


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
