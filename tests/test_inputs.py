"""Inputs from users (streamguard.inputs): fetch by URL, multipart upload to
disk, recognition by content.

- fetch: against a real aiohttp file server on loopback (tests/http_files.py):
  redirects, 404, 500-then-OK, a body cut mid-way and resumed with Range (and a
  server that ignores Range), stalls and the whole-fetch time limit, size
  limits, the input address rules on every hop (a second server on 127.0.0.2
  counts any connection a refused hop would have made) and DNS pinning.
- upload: a real aiohttp app whose route calls receive_multipart, fed by a
  real client whose body is generated on the fly (2 GiB + 1 byte never exists).
- sniff: generated mp4/mkv/ts/webm, images, text, audio, truncated files.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterator
from urllib.parse import quote

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from http_files import FileServer  # noqa: E402

from streamguard.config import SourcesSettings  # noqa: E402
from streamguard.errors import AddressRefused, InputInvalid, InputUnreachable, PayloadTooLarge  # noqa: E402
from streamguard.inputs import fetch as fetch_module  # noqa: E402
from streamguard.inputs.fetch import FetchLimits, download, fetch_bytes  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# Loopback is private: the rules refuse it unless allowed. 127.0.0.1 is the
# allowed network; 127.0.0.2 stands for any refused address.
ALLOWED = SourcesSettings(allow_private=False, allowed_networks=["127.0.0.1/32"])
FAST = FetchLimits(max_bytes=1 << 20, timeout=10, retries=3, backoff=0.05, stall_timeout=2)
DATA = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        server.add("data.bin", DATA)
        yield server


@pytest.fixture(scope="module")
def refused_host() -> Iterator[FileServer]:
    """A server at a refused address: any request it sees is a hop that was connected to."""
    with FileServer("127.0.0.2") as server:
        server.add("data.bin", DATA)
        yield server


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_download_writes_the_file_and_follows_redirects(files: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "in.bin"
    n = await download(files.url("/redirect/3/files/data.bin"), dest, sources=ALLOWED, limits=FAST)
    assert n == len(DATA) and dest.read_bytes() == DATA
    assert _leftovers(tmp_path) == ["in.bin"]


async def test_more_than_five_redirects_is_unreachable(files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(InputUnreachable, match="redirected more than 5 times"):
        await download(files.url("/redirect/6/files/data.bin"), tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert _leftovers(tmp_path) == []


async def test_http_404_is_final_and_says_so(files: FileServer, tmp_path: Path) -> None:
    before = files.hits
    with pytest.raises(InputUnreachable) as info:
        await download(files.url("/status/404"), tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert info.value.message == "HTTP 404 fetching inputUrl"
    assert info.value.http_status == 502 and info.value.details == {"field": "inputUrl", "status": 404}
    assert files.hits == before + 1  # a 4xx is never retried
    assert _leftovers(tmp_path) == []


async def test_500_then_ok_is_retried(files: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "in.bin"
    assert await download(files.url("/flaky/a/2/data.bin"), dest, sources=ALLOWED, limits=FAST) == len(DATA)
    assert dest.read_bytes() == DATA


async def test_5xx_after_three_retries_is_unreachable(files: FileServer, tmp_path: Path) -> None:
    before = files.hits
    with pytest.raises(InputUnreachable, match=r"^inputUrl unreachable after 3 retries: HTTP 503"):
        await download(files.url("/status/503"), tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert files.hits == before + 4
    assert _leftovers(tmp_path) == []


async def test_429_and_408_are_retried_other_4xx_are_not(files: FileServer, tmp_path: Path) -> None:
    for code, tries in ((429, 4), (408, 4), (403, 1), (410, 1)):
        before = files.hits
        with pytest.raises(InputUnreachable):
            await download(files.url(f"/status/{code}"), tmp_path / "x", sources=ALLOWED, limits=FAST)
        assert files.hits - before == tries, code


async def test_a_redirect_to_another_scheme_is_not_followed(files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(InputUnreachable, match=r"^inputUrl \(redirect 1\) is not an http\(s\) URL$"):
        await download(files.url(f"/to?url={quote('file:///etc/passwd')}"), tmp_path / "x", sources=ALLOWED,
                       limits=FAST)


async def test_connection_refused_is_retried_then_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputUnreachable, match="^inputUrl unreachable after 3 retries: connection refused$"):
        await download(f"http://127.0.0.1:{port}/x", tmp_path / "x", sources=ALLOWED, limits=FAST)


async def test_a_cut_body_resumes_with_range_and_if_range(files: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "in.bin"
    assert await download(files.url("/cut/k1/data.bin"), dest, sources=ALLOWED, limits=FAST) == len(DATA)
    assert dest.read_bytes() == DATA
    first, second = [h for p, h in files.requests if p == "/cut/k1/data.bin"]
    assert "Range" not in first
    assert second["Range"] == f"bytes={len(DATA) // 2}-"
    assert second["If-Range"] == files._etag(DATA)


async def test_a_server_that_ignores_range_restarts_cleanly(files: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "in.bin"
    assert await download(files.url("/cut-norange/k2/data.bin"), dest, sources=ALLOWED, limits=FAST) == len(DATA)
    assert dest.read_bytes() == DATA  # the first half is not there twice


async def test_size_limit_up_front_and_while_streaming(files: FileServer, tmp_path: Path) -> None:
    for path in ("/big?size=2000000", "/big?size=2000000&chunked=1"):
        with pytest.raises(PayloadTooLarge) as info:
            await download(files.url(path), tmp_path / "x", sources=ALLOWED, limits=FAST)
        assert info.value.http_status == 413 and info.value.details["limit"] == FAST.max_bytes
        assert _leftovers(tmp_path) == []


async def test_a_large_download_streams_with_bounded_memory(files: FileServer, tmp_path: Path) -> None:
    size = 100 << 20
    baseline, peak, stop = _rss_kib(), [0], asyncio.Event()
    watcher = asyncio.create_task(_watch_rss(stop, peak))
    began = time.monotonic()
    try:
        n = await download(files.url(f"/big?size={size}"), tmp_path / "big.bin", sources=ALLOWED,
                           limits=FetchLimits(max_bytes=size, timeout=30))
    finally:
        stop.set()
        await watcher
    print(f"{size >> 20} MiB downloaded in {time.monotonic() - began:.2f} s, "
          f"peak RSS +{peak[0] - baseline} KiB")
    assert n == size == (tmp_path / "big.bin").stat().st_size
    assert peak[0] - baseline < 32 << 10


async def test_one_time_limit_for_the_whole_fetch(files: FileServer, tmp_path: Path) -> None:
    files.add("slow.bin", bytes(20_000))
    limits = FetchLimits(max_bytes=1 << 20, timeout=0.8, retries=3, backoff=0.05, stall_timeout=5)
    began = time.monotonic()
    with pytest.raises(InputUnreachable, match=r"^inputUrl took longer than 0.8 s$"):
        await download(files.url("/slow/slow.bin?bps=5000"), tmp_path / "x", sources=ALLOWED, limits=limits)
    assert time.monotonic() - began < 2
    assert _leftovers(tmp_path) == []


async def test_a_stalled_server_is_retried_within_the_time_limit(files: FileServer, tmp_path: Path) -> None:
    limits = FetchLimits(max_bytes=1 << 20, timeout=10, retries=1, backoff=0.05, stall_timeout=0.3)
    with pytest.raises(InputUnreachable, match=r"^inputUrl unreachable after 1 retries: no response in time$"):
        await download(files.url("/hang"), tmp_path / "x", sources=ALLOWED, limits=limits)


@pytest.mark.parametrize("url", ["ftp://example.com/a.mp4", "file:///etc/passwd", "not a url", "http://"])
async def test_only_http_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(InputInvalid) as info:
        await download(url, tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert info.value.http_status == 400 and info.value.details == {"field": "inputUrl"}
    assert "http:// or https://" in info.value.message


# --------------------------------------------------------------------------- address rules


async def test_a_refused_address_is_never_connected_to(refused_host: FileServer, tmp_path: Path) -> None:
    before = refused_host.hits
    with pytest.raises(AddressRefused) as info:
        await download(refused_host.url("/files/data.bin"), tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert info.value.http_status == 422
    assert info.value.details["field"] == "inputUrl" and info.value.details["hop"] == 0
    assert "sources.allowed_networks" in info.value.message
    assert refused_host.hits == before


async def test_a_redirect_to_a_refused_address_is_not_followed(files: FileServer, refused_host: FileServer,
                                                                tmp_path: Path) -> None:
    target = refused_host.url("/files/data.bin")
    before = refused_host.hits
    with pytest.raises(AddressRefused) as info:
        await download(files.url(f"/redirect/2/to?url={quote(target)}"), tmp_path / "x", sources=ALLOWED, limits=FAST)
    assert info.value.details["hop"] == 3 and info.value.details["address"] == "127.0.0.2"
    assert info.value.message.startswith("inputUrl (redirect 3) host 127.0.0.2 is a private")
    assert refused_host.hits == before
    assert _leftovers(tmp_path) == []


async def test_allow_private_allows_every_hop(files: FileServer, refused_host: FileServer, tmp_path: Path) -> None:
    target = refused_host.url("/files/data.bin")
    dest = tmp_path / "in.bin"
    await download(files.url(f"/to?url={quote(target)}"), dest, sources=SourcesSettings(allow_private=True),
                   limits=FAST)
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("name, asked_as", [("rebind.test", "rebind.test"),
                                            ("bücher.test", "xn--bcher-kva.test")])  # an IDN: asked as sent
async def test_names_are_resolved_once_and_connected_to_as_judged(files: FileServer, tmp_path: Path,
                                                                   name: str, asked_as: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a name that answers an allowed address when judged and a
    refused one a moment later. The client connects where the check looked."""
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)
    asked: list[str] = []

    class Rebinding:
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
            asked.append(host)
            return [{"hostname": host, "host": next(answers), "port": port, "family": socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}]

    monkeypatch.setattr(fetch_module, "ThreadedResolver", Rebinding)
    dest = tmp_path / "in.bin"
    # Nothing listens on 127.0.0.2 at this port: a second lookup would make the fetch fail.
    url = f"http://{name}:{files.port}/files/data.bin"
    assert await download(url, dest, sources=ALLOWED, limits=FAST) == len(DATA)
    assert asked == [asked_as]


async def test_an_unresolvable_name_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(InputUnreachable, match=r"^inputUrl host no-such-host\.invalid cannot be resolved$"):
        await download("http://no-such-host.invalid/x.mp4", tmp_path / "x", sources=ALLOWED, limits=FAST)


async def test_fetch_bytes_for_small_inputs(files: FileServer, refused_host: FileServer) -> None:
    assert await fetch_bytes(files.url("/redirect/1/files/data.bin"), sources=ALLOWED, limits=FAST) == DATA
    with pytest.raises(PayloadTooLarge):
        await fetch_bytes(files.url("/files/data.bin"), sources=ALLOWED,
                          limits=FetchLimits(max_bytes=1000, timeout=5))
    before = refused_host.hits
    with pytest.raises(AddressRefused) as info:
        await fetch_bytes(refused_host.url("/files/data.bin"), sources=ALLOWED, limits=FAST, field="inputUrls[2]")
    assert info.value.details["field"] == "inputUrls[2]" and refused_host.hits == before


# --------------------------------------------------------------------------- upload

BOUNDARY = "sgboundary7MA4YWxkTrZu0gW"
GiB = 1 << 30


def _part(name: str, filename: str | None = None, ctype: str = "application/octet-stream") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n".encode()


def _form(*parts: tuple[str, str | None, bytes]) -> bytes:
    return b"".join(_part(n, f) + data + b"\r\n" for n, f, data in parts) + f"--{BOUNDARY}--\r\n".encode()


class Generated:
    """A multipart body of one file part of `size` bytes, made on the fly;
    `sent` counts the file bytes handed to the client so far."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.head = _part("title", None, "text/plain") + b"my video\r\n" + _part("video", "big.mp4")
        self.tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    @property
    def length(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        block = bytes(1 << 20)
        while self.sent < self.size:
            n = min(len(block), self.size - self.sent)
            self.sent += n
            yield block[:n]
        yield self.tail


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class UploadApp:
    """The daemon's way of serving (ApiRunner, the error middleware, a 1 MiB
    client_max_size) around one route that calls receive_multipart."""

    def __init__(self, dest: Path) -> None:
        from aiohttp import web

        from streamguard.api.envelope import ApiRunner, error_middleware, ok
        from streamguard.inputs.upload import receive_multipart

        async def upload(request: web.Request) -> web.Response:
            got = await receive_multipart(request, dest, file_field=request.query.get("field", "video"),
                                          max_bytes=int(request.query["max"]),
                                          max_files=int(request.query.get("files", "1")))
            return ok({"sizes": [p.stat().st_size for p in got.files], "fields": got.fields,
                       "filenames": got.filenames, "names": [p.name for p in got.files]})

        app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
        app.router.add_post("/upload", upload)
        self.runner = ApiRunner(app, access_log=None)
        self.dest = dest
        self.port = 0

    async def __aenter__(self) -> "UploadApp":
        from aiohttp import web
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def url(self, query: str) -> str:
        return f"http://127.0.0.1:{self.port}/upload?{query}"


@pytest.fixture
async def upload_app(tmp_path: Path) -> AsyncIterator[UploadApp]:
    async with UploadApp(tmp_path) as app:
        yield app


async def _post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    import aiohttp
    ctype = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers={**ctype, **(headers or {})}) as resp:
            return resp.status, await resp.json()


async def test_upload_streams_files_to_disk_past_client_max_size(upload_app: UploadApp) -> None:
    video = bytes(range(256)) * (12 << 12)  # 12 MiB: far past the app's 1 MiB client_max_size
    body = _form(("video", "clip.mp4", video), ("title", None, "été".encode()), ("tags", None, b'["a"]'))
    status, reply = await _post(upload_app.url(f"max={len(body)}"), body)
    assert status == 200, reply
    data = reply["data"]
    assert data["sizes"] == [len(video)] and data["fields"] == {"title": "été", "tags": '["a"]'}
    assert data["filenames"] == ["clip.mp4"]
    assert (upload_app.dest / data["names"][0]).read_bytes() == video


async def test_upload_many_files(upload_app: UploadApp) -> None:
    body = _form(*[("images", f"{i}.png", bytes([i]) * 1000) for i in range(3)])
    status, reply = await _post(upload_app.url("max=2000&field=images&files=3"), body)
    assert status == 200 and reply["data"]["sizes"] == [1000, 1000, 1000]
    kept = _leftovers(upload_app.dest)
    assert kept == sorted(reply["data"]["names"])  # the caller's to use and remove
    status, reply = await _post(upload_app.url("max=2000&field=images&files=2"), body)
    assert status == 400 and reply["error"]["details"] == {"field": "images", "limit": 2}
    assert _leftovers(upload_app.dest) == kept  # the refused request's two files are gone


async def _watch_rss(stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss_kib())
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_oversize_upload_is_refused_early_with_bounded_memory(upload_app: UploadApp,
                                                                       declared: bool) -> None:
    """2 GiB + 1 byte, generated on the fly. With Content-Length the limit (2 GiB)
    refuses it before any byte of the body is read; sent chunked, with an 8 MiB
    limit, as soon as the file passes 8 MiB. Either way the reply comes long
    before the body would have been sent, the connection closes (the generator
    is not drained), memory stays flat and no file is left."""
    body = Generated(2 * GiB + 1)
    limit = 2 * GiB if declared else 8 << 20
    headers = {"Content-Length": str(body.length)} if declared else {}
    baseline, peak, stop = _rss_kib(), [0], asyncio.Event()
    watcher = asyncio.create_task(_watch_rss(stop, peak))
    began = time.monotonic()
    try:
        status, reply = await asyncio.wait_for(_post(upload_app.url(f"max={limit}"), body.__aiter__(), headers), 20)
    finally:
        stop.set()
        await watcher
    elapsed = time.monotonic() - began
    print(f"413 after {elapsed:.3f} s, {body.sent} of {body.size} file bytes sent, "
          f"peak RSS +{peak[0] - baseline} KiB")
    assert status == 413 and reply["error"]["code"] == "STREAMGUARD_PAYLOAD_TOO_LARGE", reply
    assert reply["error"]["details"]["field"] == "video"
    assert body.sent < 64 << 20, f"{body.sent} bytes were sent before the 413"
    assert elapsed < 5
    assert peak[0] - baseline < 64 << 10, f"RSS grew by {(peak[0] - baseline) >> 10} MiB"
    assert _leftovers(upload_app.dest) == []


async def test_after_a_413_the_connection_closes_without_reading_the_body(upload_app: UploadApp) -> None:
    """A raw client that keeps sending: the reply arrives, then the server
    closes instead of reading the rest."""
    body = Generated(2 * GiB + 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", upload_app.port)
    writer.write((f"POST /upload?max={8 << 20} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                  f"Content-Length: {body.length - 1000}\r\n\r\n").encode())

    async def send() -> None:
        try:
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    sender = asyncio.create_task(send())
    try:
        reply = await asyncio.wait_for(reader.read(-1), 10)  # to EOF: the server closed
    finally:
        sender.cancel()
        writer.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert body.sent < 64 << 20


async def test_a_body_that_is_not_multipart_is_415(upload_app: UploadApp) -> None:
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async with session.post(upload_app.url("max=1000"), json={"inputUrl": "x"}) as resp:
            assert resp.status == 415
            error = (await resp.json())["error"]
    assert error["code"] == "STREAMGUARD_UNSUPPORTED_MEDIA_TYPE" and error["details"]["field"] == "video"
    assert "multipart/form-data" in error["message"]


@pytest.mark.parametrize("body, status, field, words", [
    (_form(("title", None, b"x")), 400, "video", "no file in field 'video'"),
    (_form(("video", "a.mp4", b"x" * 1001)), 413, "video", "larger than the limit of 1000 bytes"),
    (_form(("video", "a.mp4", b"x"), ("other", "b.mp4", b"y")), 400, "other", "unexpected file"),
    (_form(("video", "a.mp4", b"x"), ("title", None, b"a" * (65 << 10))), 413, "title", "form field 'title'"),
    (_form(("video", "a.mp4", b"x"), ("t", None, b"1"), ("t", None, b"2")), 400, "t", "more than once"),
    (_form(("video", "a.mp4", b"x"), *[(f"f{i}", None, b"1") for i in range(33)]), 400, "f32", "more than 32"),
    (_form(("video", "a.mp4", b"x"), ("title", None, b"\xff\xfe")), 400, "title", "not valid text"),
    (_part("video", "a.mp4") + b"x" * 100, 400, "video", "malformed"),  # no closing boundary
    (_form(("video", "a" * 20000 + ".mp4", b"x")), 400, "video", "malformed"),  # a part header line of 20 kB
], ids=["no-file", "file-too-large", "stray-file", "field-too-large", "repeated-field", "too-many-fields",
        "bad-text", "truncated", "long-part-header"])
async def test_bad_forms(upload_app: UploadApp, body: bytes, status: int, field: str, words: str) -> None:
    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: every limit is met while streaming
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    got, reply = await _post(upload_app.url("max=1000"), chunked())
    assert got == status, reply
    assert reply["error"]["details"]["field"] == field and words in reply["error"]["message"]
    assert _leftovers(upload_app.dest) == []


# --------------------------------------------------------------------------- sniff

from streamguard.inputs.sniff import VideoInfo, probe_image, probe_video  # noqa: E402


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 s of 160x120 video with audio in four containers, and things that are not video."""
    import subprocess

    from live_servers import FFMPEG
    from PIL import Image
    from videos import make_video

    d = tmp_path_factory.mktemp("sniff")
    mp4 = make_video(d / "clip.mp4", seconds=2, fps=10, width=160, height=120)

    def ffmpeg(*args: str) -> None:
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(mp4), *args], check=True, timeout=60)

    ffmpeg("-c", "copy", str(d / "clip.mkv"))
    ffmpeg("-c", "copy", str(d / "clip.ts"))
    ffmpeg("-c:v", "libvpx", "-deadline", "realtime", "-b:v", "200k", "-c:a", "libopus", str(d / "clip.webm"))
    ffmpeg("-vn", "-c", "copy", str(d / "audio.m4a"))
    ffmpeg("-c", "copy", "-movflags", "+faststart", str(d / "faststart.mp4"))
    data = mp4.read_bytes()
    (d / "cut.mp4").write_bytes(data[:len(data) // 2])  # the index (moov) was at the end: gone
    fast = (d / "faststart.mp4").read_bytes()
    (d / "cut-faststart.mp4").write_bytes(fast[:len(fast) * 6 // 10])  # index intact, tail missing
    (d / "mp4-named.txt").write_bytes(data)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "picture.png")
    (d / "picture-named.mp4").write_bytes((d / "picture.png").read_bytes())
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "picture.jpg")
    (d / "notes.txt").write_text("just some notes\n" * 100)
    (d / "notes").write_text("just some notes\n" * 100)
    (d / "empty.mp4").write_bytes(b"")
    (d / "noise.bin").write_bytes(bytes((i * 7919) % 251 for i in range(20000)))
    return {p.name: p for p in d.iterdir()}


@pytest.mark.parametrize("name, container, audio", [
    ("clip.mp4", "mov,mp4,m4a,3gp,3g2,mj2", True),
    ("clip.mkv", "matroska,webm", True),
    ("clip.ts", "mpegts", True),
    ("clip.webm", "matroska,webm", True),
    ("faststart.mp4", "mov,mp4,m4a,3gp,3g2,mj2", True),
    ("mp4-named.txt", "mov,mp4,m4a,3gp,3g2,mj2", True),  # by content, not by name
])
def test_videos_are_recognised(media: dict[str, Path], name: str, container: str, audio: bool) -> None:
    info = probe_video(media[name])
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.container, info.has_audio) == (160, 120, container, audio)
    assert info.duration is not None and 1.8 <= info.duration <= 2.2


@pytest.mark.parametrize("name, reason, words", [
    ("picture.png", "image", "the file at inputUrl is an image (PNG), not a video"),
    ("picture-named.mp4", "image", "is an image (PNG), not a video"),
    ("picture.jpg", "image", "is an image (JPEG), not a video"),
    ("notes.txt", "text", "is text, not a video"),  # FFmpeg's tty demuxer claims .txt
    ("notes", "unreadable", "is not a video file (FFmpeg: "),
    ("noise.bin", "unreadable", "is not a video file (FFmpeg: "),
    ("audio.m4a", "audio_only", "no video stream (it contains audio)"),
    ("cut.mp4", "unreadable", "is not a video file (FFmpeg: "),
    ("cut-faststart.mp4", "corrupt", "truncated or corrupt"),
    ("empty.mp4", "empty", "is empty"),
])
def test_what_is_not_video_is_refused(media: dict[str, Path], name: str, reason: str, words: str) -> None:
    with pytest.raises(InputInvalid) as info:
        probe_video(media[name], field="inputUrl")
    assert info.value.http_status == 400
    assert info.value.details == {"field": "inputUrl", "reason": reason}
    assert words in info.value.message and str(media[name]) not in info.value.message


@pytest.mark.parametrize("fmt, name", [("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("WEBP", "WEBP"),
                                       ("BMP", "BMP"), ("TIFF", "TIFF"), ("TIFF-BE", "TIFF")])
def test_images_are_recognised_by_their_bytes(fmt: str, name: str) -> None:
    from PIL import Image
    buf = io.BytesIO()
    image = Image.new("RGB", (32, 24), (10, 200, 30))
    if fmt == "TIFF-BE":
        image.save(buf, format="TIFF", tiffinfo={}, **{"big_endian": True})
    else:
        image.save(buf, format=fmt)
    data = buf.getvalue()
    assert probe_image(data) == name
    with Image.open(io.BytesIO(data), formats=[probe_image(data)]) as opened:
        assert opened.size == (32, 24)


@pytest.mark.parametrize("data, words", [
    (b"", "is empty"),
    (b"<!doctype html><html><body>not found</body></html>", "looks like HTML"),
    (b"just some words\n" * 10, "looks like text"),
    (b"\x00\x00\x00\x20ftypisom" + bytes(100), "looks like a video"),
    (b"BM" + bytes(30), "match none"),  # "BM" text, not a bitmap header
    (bytes(range(256)), "match none"),
])
def test_what_is_not_an_image_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(InputInvalid) as info:
        probe_image(data, field="inputUrls[1]")
    assert info.value.http_status == 400 and info.value.details["field"] == "inputUrls[1]"
    assert words in info.value.message
