"""/media/...: the files the daemon wrote under the media root (HLS playlists,
segments, thumbnails), served to players on any origin."""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path, PurePosixPath

from aiohttp import web

from .requests import RUNTIME
from ..errors import NotFound

mimetypes.add_type("application/vnd.apple.mpegurl", ".m3u8")
mimetypes.add_type("video/mp2t", ".ts")


async def media(request: web.Request) -> web.StreamResponse:
    """A file the daemon wrote under the media root (segments, playlists, thumbnails)."""
    name = request.match_info["path"]
    root = request.app[RUNTIME].media_root
    path = await asyncio.get_running_loop().run_in_executor(None, media_file, root, name)
    if path is None:
        raise NotFound(f"no media file {name}")
    return web.FileResponse(path)


def media_file(root: Path, name: str) -> Path | None:
    """The regular file `name` names under `root`, or None: nothing outside the root,
    no directories, no symlinks out of it."""
    if PurePosixPath(name).is_absolute():
        return None
    base = root.resolve()
    try:
        path = (base / name).resolve()
    except (OSError, RuntimeError):  # symlink loops
        return None
    return path if path.is_relative_to(base) and path.is_file() else None


async def media_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: CORS for every media reply, no caching of playlists."""
    if request.path.startswith("/media/"):
        response.headers["Access-Control-Allow-Origin"] = "*"  # players on other origins (hls.js)
        if request.path.endswith(".m3u8"):
            response.headers["Cache-Control"] = "no-cache"  # live playlists change
