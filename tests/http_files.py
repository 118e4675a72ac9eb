"""A real HTTP file server on loopback for tests that fetch inputs by URL
(tests/test_inputs.py, file jobs, standalone checks).

It runs its own event loop in a thread, so sync tests, async tests on any
loop and a daemon in another process can all use it:

    with FileServer() as files:              # 127.0.0.1, a free port
        url = files.add("clip.mp4", path)    # or bytes
        files.url("/redirect/3/files/clip.mp4")

Routes (NAME is a file added with `add`; KEY any string, to keep counters of
one test apart from another's):
    /files/NAME                   the file; honours `Range: bytes=N-` and If-Range (ETag)
    /redirect/N/REST              302 -> /redirect/N-1/REST ... -> /REST
    /to?url=URL                   302 -> URL (anywhere, e.g. another address)
    /status/CODE                  that status, a short text body
    /flaky/KEY/FAILS/NAME         the first FAILS requests for KEY answer 500, then the file
    /cut/KEY/NAME                 the first request for KEY sends half the body and drops the
                                  connection; later ones serve the file (Range honoured)
    /cut-norange/KEY/NAME         the same, but later requests ignore Range (200, whole file)
    /slow/NAME?bps=N              the file at N bytes per second
    /hang                         headers never come (until the server stops)
    /big?size=N[&chunked=1]       N zero bytes, with Content-Length unless chunked

`requests` records (path, headers) of every request; `hits` counts them.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

CHUNK = 64 << 10


class FileServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.counters: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"files-{host}", daemon=True)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "FileServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.add_routes([
            web.get("/files/{name}", self._file),
            web.get("/redirect/{n:\\d+}/{rest:.*}", self._redirect),
            web.get("/to", self._to),
            web.get("/status/{code:\\d+}", self._status),
            web.get("/flaky/{key}/{fails:\\d+}/{name}", self._flaky),
            web.get("/cut/{key}/{name}", self._cut),
            web.get("/cut-norange/{key}/{name}", self._cut),
            web.get("/slow/{name}", self._slow),
            web.get("/hang", self._hang),
            web.get("/big", self._big),
        ])
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await self._runner.cleanup()

    # --- use ---------------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, name: str, content: bytes | Path) -> str:
        """Serve `content` as /files/NAME; the file's URL."""
        self.files[name] = content.read_bytes() if isinstance(content, Path) else content
        return self.url(f"/files/{name}")

    @property
    def hits(self) -> int:
        return len(self.requests)

    # --- handlers ----------------------------------------------------------------------------------

    def _log(self, request: web.Request) -> None:
        self.requests.append((request.path_qs, dict(request.headers)))

    def _data(self, request: web.Request) -> bytes:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound(text=f"no file {name}")
        return self.files[name]

    @staticmethod
    def _etag(data: bytes) -> str:
        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'

    async def _serve(self, request: web.Request, data: bytes, *, ranges: bool = True) -> web.Response:
        """The file, or from byte N on for `Range: bytes=N-` (when If-Range, if any, matches)."""
        etag = self._etag(data)
        headers = {"ETag": etag, "Content-Type": "application/octet-stream"}
        if ranges:
            headers["Accept-Ranges"] = "bytes"
        spec = request.headers.get("Range", "")
        if_range = request.headers.get("If-Range")
        if ranges and spec.startswith("bytes=") and spec.endswith("-") and if_range in (None, etag):
            start = int(spec[6:-1])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return web.Response(status=206, body=data[start:], headers=headers)
        return web.Response(body=data, headers=headers)

    async def _file(self, request: web.Request) -> web.Response:
        self._log(request)
        return await self._serve(request, self._data(request))

    async def _redirect(self, request: web.Request) -> web.Response:
        self._log(request)
        n, rest = int(request.match_info["n"]), request.match_info["rest"]
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPFound((f"/redirect/{n - 1}/{rest}" if n > 1 else f"/{rest}") + query)

    async def _to(self, request: web.Request) -> web.Response:
        self._log(request)
        raise web.HTTPFound(request.query["url"])

    async def _status(self, request: web.Request) -> web.Response:
        self._log(request)
        return web.Response(status=int(request.match_info["code"]), text="status page\n")

    async def _flaky(self, request: web.Request) -> web.Response:
        self._log(request)
        key = "flaky/" + request.match_info["key"]
        self.counters[key] += 1
        if self.counters[key] <= int(request.match_info["fails"]):
            return web.Response(status=500, text="try again\n")
        return await self._serve(request, self._data(request))

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        data = self._data(request)
        key = request.path
        self.counters[key] += 1
        ranges = not request.path.startswith("/cut-norange/")
        if self.counters[key] > 1:
            return await self._serve(request, data, ranges=ranges)
        resp = web.StreamResponse(headers={"Content-Length": str(len(data)), "ETag": self._etag(data),
                                           "Content-Type": "application/octet-stream",
                                           **({"Accept-Ranges": "bytes"} if ranges else {})})
        await resp.prepare(request)
        await resp.write(data[:len(data) // 2])
        assert request.transport is not None
        request.transport.abort()  # mid-body, as a dropped connection does
        return resp

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        data = self._data(request)
        bps = int(request.query.get("bps", "1000"))
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        step = max(1, bps // 10)
        for i in range(0, len(data), step):
            await resp.write(data[i:i + step])
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    async def _hang(self, request: web.Request) -> web.Response:
        self._log(request)
        assert self._stopping is not None
        await self._stopping.wait()
        return web.Response(text="late\n")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        size = int(request.query["size"])
        headers: dict[str, Any] = {} if request.query.get("chunked") else {"Content-Length": str(size)}
        resp = web.StreamResponse(headers=headers)
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        zeros = bytes(CHUNK)
        sent = 0
        try:
            while sent < size and not self._stopping.is_set():  # type: ignore[union-attr]
                n = min(CHUNK, size - sent)
                await resp.write(zeros[:n])
                sent += n
        except (ConnectionError, RuntimeError):  # the client hung up: what a size limit does
            return resp
        await resp.write_eof()
        return resp
