"""Live sources that are not live (CONTRACT §2): recordings refused at start,
an ended source never replayed from its start, only real video accepted.

- The probe (streamguard.media.probe) against a real aiohttp server on
  loopback: files, finished and live playlists, master playlists, redirects,
  text, errors and timeouts.
- The replay guard (streamguard.media.replay) on real MPEG-TS files.
- End to end with a real daemon (tests/daemon.py): a VOD mp4 URL, an ENDLIST
  playlist, a master playlist of one and a .txt URL get 422; a live HLS
  (ffmpeg writing it) that ends -> 15, never replayed; an HTTP stream that
  restarts at its beginning on every connection -> 15, never replayed.
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402
from daemon import Daemon  # noqa: E402

from streamguard.errors import NotLiveSource  # noqa: E402
from streamguard.media.probe import (PLAYLIST_BYTES, Verdict, check_live_source, finished_playlist,  # noqa: E402
                                     probe_http_source)
from streamguard.media.replay import ReplayGuard  # noqa: E402
from streamguard.media.source import MediaSource, SourceOptions  # noqa: E402

pytestmark = pytest.mark.timeout(120)

LIVE_PLAYLIST = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n" + "".join(
    f"#EXTINF:2.0,\nseg{i}.ts\n" for i in range(7, 10))
ENDED_PLAYLIST = LIVE_PLAYLIST + "#EXT-X-ENDLIST\n"
MASTER = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=320x240\n{}\n"
MPEGURL = "application/vnd.apple.mpegurl"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4 s mp4 and its MPEG-TS remux, plus the TS cut in two overlapping halves."""
    d = tmp_path_factory.mktemp("sources")
    mp4 = ls.make_test_video(d / "vod.mp4", seconds=4, width=160, height=120, red_ranges=(), audio=False)
    ts = d / "vod.ts"
    subprocess.run([ls.FFMPEG, "-v", "error", "-i", str(mp4), "-c", "copy", str(ts)], check=True)
    subprocess.run([ls.FFMPEG, "-v", "error", "-i", str(ts), "-c", "copy", "-f", "segment", "-segment_time", "1",
                    str(d / "part%d.ts")], check=True)
    parts = [(d / f"part{i}.ts").read_bytes() for i in range(4)]
    (d / "first.ts").write_bytes(b"".join(parts[:3]))  # 0-3 s
    (d / "overlap.ts").write_bytes(b"".join(parts[1:]))  # 1-4 s: 1-3 s seen before
    return {"mp4": mp4, "ts": ts, "first": d / "first.ts", "overlap": d / "overlap.ts"}


# --------------------------------------------------------------------------- the probe


@pytest.fixture
async def site(media: dict[str, Path]) -> AsyncIterator[Callable[[str], str]]:
    mp4 = media["mp4"].read_bytes()
    ts = media["ts"].read_bytes()

    def text(body: str, ctype: str = MPEGURL) -> Callable:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=body.encode(), content_type=ctype)
        return handler

    async def chunked(request: web.Request, body: bytes, ctype: str, hold: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(body[:8192])
        if hold:  # an unbounded stream: more comes later (the probe has what it needs by then)
            await asyncio.sleep(5)
        return resp

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    big_live = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n" + "#EXTINF:2.0,\nseg.ts\n" * (PLAYLIST_BYTES // 20)
    big_ended = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n" + "#EXTINF:2.0,\nseg.ts\n" * (PLAYLIST_BYTES // 40) + \
        "#EXT-X-ENDLIST\n"
    def fixed(body: bytes, ctype: str) -> Callable:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ctype)
        return handler

    def stream(body: bytes, ctype: str, hold: bool) -> Callable:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await chunked(request, body, ctype, hold)
        return handler

    def redirect(to: str) -> Callable:
        async def handler(_: web.Request) -> web.Response:
            raise web.HTTPFound(to)
        return handler

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404, text="no")

    app = web.Application()
    app.add_routes([
        web.get("/vod.mp4", fixed(mp4, "video/mp4")),
        web.get("/chunked.mp4", stream(mp4, "application/octet-stream", hold=False)),
        web.get("/live.ts", stream(ts, "video/mp2t", hold=True)),
        web.get("/live.m3u8", text(LIVE_PLAYLIST)),
        web.get("/ended.m3u8", text(ENDED_PLAYLIST)),
        web.get("/ended-as-text.m3u8", text(ENDED_PLAYLIST, "text/plain")),
        web.get("/vod-type.m3u8", text(LIVE_PLAYLIST.replace("#EXT-X-VERSION:3", "#EXT-X-PLAYLIST-TYPE:VOD"))),
        web.get("/big-live.m3u8", text(big_live)),
        web.get("/big-ended.m3u8", text(big_ended)),
        web.get("/hls/master.m3u8", text(MASTER.format("low/ended.m3u8"))),
        web.get("/hls/low/ended.m3u8", text(ENDED_PLAYLIST)),
        web.get("/hls/master-live.m3u8", text(MASTER.format("/live.m3u8"))),
        web.get("/redirect", redirect("/hls/master.m3u8")),
        web.get("/redirect-loop", redirect("/redirect-loop")),
        web.get("/notes.txt", text("just some notes\n" * 50, "text/plain")),
        web.get("/missing.m3u8", missing),
        web.get("/slow.m3u8", slow),
    ])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield lambda path: str(server.make_url(path))
    finally:
        await server.close()


@pytest.mark.parametrize("path, verdict", [
    ("/vod.mp4", Verdict.FILE),
    ("/chunked.mp4", Verdict.FILE),  # no Content-Length, but an mp4's first bytes
    ("/live.ts", Verdict.LIVE),
    ("/live.m3u8", Verdict.LIVE),
    ("/ended.m3u8", Verdict.ENDED),
    ("/ended-as-text.m3u8", Verdict.ENDED),
    ("/vod-type.m3u8", Verdict.ENDED),
    ("/big-ended.m3u8", Verdict.ENDED),  # ENDLIST comes last: the playlist is read whole
    ("/big-live.m3u8", Verdict.UNKNOWN),  # past the read cap: cannot tell
    ("/hls/master.m3u8", Verdict.ENDED),
    ("/hls/master-live.m3u8", Verdict.LIVE),
    ("/redirect", Verdict.ENDED),
    ("/redirect-loop", Verdict.UNKNOWN),
    ("/notes.txt", Verdict.NOT_VIDEO),
    ("/missing.m3u8", Verdict.UNKNOWN),
])
async def test_probe_verdicts(site: Callable[[str], str], path: str, verdict: Verdict) -> None:
    t = time.monotonic()
    probe = await probe_http_source(site(path), timeout=3)
    assert probe.verdict is verdict, probe
    assert time.monotonic() - t < 2.5


async def test_probe_of_a_silent_or_closed_url_is_unknown_within_its_timeout(site: Callable[[str], str]) -> None:
    for url in (site("/slow.m3u8"), f"http://127.0.0.1:{ls.closed_port()}/live.m3u8"):
        t = time.monotonic()
        probe = await probe_http_source(url, timeout=1)
        assert probe.verdict is Verdict.UNKNOWN, probe
        assert time.monotonic() - t < 1.5


async def test_every_hop_is_checked_before_it_is_connected_to(site: Callable[[str], str]) -> None:
    hops: list[str] = []

    async def check(url: str) -> None:
        hops.append(url)

    await probe_http_source(site("/redirect"), 3, check_hop=check)
    assert hops == [site("/redirect"), site("/hls/master.m3u8"), site("/hls/low/ended.m3u8")]

    class Refused(NotLiveSource):
        pass

    async def refuse(url: str) -> None:
        if url.endswith("master.m3u8"):
            raise Refused("address refused")

    with pytest.raises(Refused):
        await probe_http_source(site("/redirect"), 3, check_hop=refuse)


async def test_check_live_source_refusals_point_at_file_jobs(site: Callable[[str], str]) -> None:
    for path in ("/vod.mp4", "/ended.m3u8", "/hls/master.m3u8"):
        with pytest.raises(NotLiveSource) as info:
            await check_live_source(site(path), 3)
        err = info.value
        assert err.http_status == 422 and err.code == "STREAMGUARD_INPUT_INVALID", err
        assert "POST /v1/jobs" in err.message and err.details["field"] == "url", err.message
    with pytest.raises(NotLiveSource, match="text/plain"):
        await check_live_source(site("/notes.txt"), 3)
    for url in (site("/live.m3u8"), site("/live.ts"), site("/missing.m3u8"), "rtmp://127.0.0.1:1/live/x"):
        await check_live_source(url, 3)


async def test_finished_playlist_from_a_thread(site: Callable[[str], str]) -> None:
    ended = await asyncio.to_thread(finished_playlist, site("/hls/master.m3u8"), 3)
    assert ended is not None and "#EXT-X-ENDLIST" in ended, ended
    for path in ("/live.m3u8", "/vod.mp4", "/missing.m3u8"):
        assert await asyncio.to_thread(finished_playlist, site(path), 3) is None


# --------------------------------------------------------------------------- the replay guard


def _video_times(path: Path, guard: ReplayGuard) -> tuple[list[float], str | None]:
    source = MediaSource(str(path), SourceOptions(), replay=guard)
    source.open()
    try:
        times = [float(p.pts * p.stream.time_base) for p in source.packets() if p.stream is source.video]
    finally:
        source.close()
    return times, source.read_error


def test_a_reconnect_skips_video_already_delivered(media: dict[str, Path]) -> None:
    guard = ReplayGuard()
    first, err = _video_times(media["first"], guard)
    assert err is None and len(first) == 75  # 3 s at 25 fps
    overlap, err = _video_times(media["overlap"], guard)
    # 1-3 s were delivered: only the last second is new, and it starts the connection's timeline
    assert err is None and len(overlap) == 25, (len(overlap), err)
    assert overlap[0] == pytest.approx(1.4)
    again, err = _video_times(media["first"], guard)  # reopened at its start
    assert again == [] and err is not None and "replays video already delivered" in err


def test_new_video_is_never_skipped(media: dict[str, Path]) -> None:
    guard = ReplayGuard()
    assert len(_video_times(media["first"], guard)[0]) == 75
    # other bytes at overlapping timestamps (a restarted encoder): new video
    assert len(_video_times(media["ts"], ReplayGuard())[0]) == 100


# --------------------------------------------------------------------------- end to end


NO_DATA_TIMEOUT = 6.0
ENV = {"STREAMGUARD_LIVE__NO_DATA_TIMEOUT": str(NO_DATA_TIMEOUT), "STREAMGUARD_LIVE__READ_TIMEOUT": "2",
       "STREAMGUARD_LIVE__OPEN_TIMEOUT": "5", "STREAMGUARD_LIVE__RECONNECT_MAX_BACKOFF": "1"}
SEG = 2


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    with Daemon(tmp_path_factory.mktemp("sources-daemon"), test_bundle, ENV) as d:
        yield d


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]):
    """A static file server (tests/live_servers.py): an mp4, playlists, a .txt."""
    d = tmp_path_factory.mktemp("www")
    (d / "vod.mp4").write_bytes(media["mp4"].read_bytes())
    (d / "ended.m3u8").write_text(ENDED_PLAYLIST)
    (d / "master.m3u8").write_text(MASTER.format("ended.m3u8"))
    (d / "notes.txt").write_text("just some notes\n" * 200)
    server = ls._HttpServerThread(d)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


def _start(d: Daemon, key: str, url: str):
    return d.call("POST", "/v1/streams", {"url": url, "segment_seconds": SEG}, key=key)


@pytest.mark.live
@pytest.mark.parametrize("name, needle", [
    ("vod.mp4", "POST /v1/jobs"), ("ended.m3u8", "POST /v1/jobs"), ("master.m3u8", "POST /v1/jobs"),
    ("notes.txt", "not a live video stream"),
])
def test_recordings_and_text_are_refused_at_start(daemon: Daemon, www: str, name: str, needle: str) -> None:
    key = daemon.create_key(f"refused-{name}")
    reply = _start(daemon, key, f"{www}/{name}")
    assert reply.status == 422, reply.body
    assert reply.error["code"] == "STREAMGUARD_INPUT_INVALID" and needle in reply.error["message"], reply.body
    assert reply.error["details"]["field"] == "url"
    listed = daemon.call("GET", "/v1/streams", key=key)
    assert listed.status == 200 and listed.data["total"] == 0, listed.body  # nothing was stored


def _segments(records: list[dict]) -> list[dict]:
    return [r["data"]["data"] for r in records if r["data"]["status"] not in (14, 15, 16, 402)]


@pytest.mark.live
def test_live_hls_that_ends_is_not_replayed(daemon: Daemon, tmp_path: Path) -> None:
    seconds = 8.0
    video = ls.make_test_video(tmp_path / "short.mp4", seconds=seconds, width=160, height=120, red_ranges=())
    key = daemon.create_key("hls-ends")
    with ls.HlsLiveSource(video, loop=False, list_size=20) as hls:
        reply = _start(daemon, key, hls.url)
        assert reply.status == 200, reply.body
        task_id = reply.body["data"]["task_id"]
        ls.wait_until(lambda: "#EXT-X-ENDLIST" in hls.playlist_path.read_text(), seconds + 10,
                      what="the source playlist to end")
        ended_at = time.monotonic()
        view = daemon.wait_stopped(task_id, key, timeout=NO_DATA_TIMEOUT + 15)
        took = time.monotonic() - ended_at
    assert view["status"] == 15 and "ended" in view["message"], view
    assert took <= NO_DATA_TIMEOUT + 5, took
    segments = _segments(daemon.records(task_id, key))
    media_seconds = sum(float(s["end_time"]) - float(s["start_time"]) for s in segments)
    # the task joins near the live edge and reads to the end: never more than the source had
    assert 0 < media_seconds <= seconds + 0.5, (media_seconds, segments)
    assert len(segments) <= seconds / SEG + 1, segments
    assert "#EXT-X-ENDLIST" in daemon.call("GET", f"/media/{task_id}/source/playlist.m3u8").body.decode()


class _Restarting(http.server.BaseHTTPRequestHandler):
    """Every GET sends the same MPEG-TS from its start, with no length (an
    unbounded-looking stream), then closes: a server that restarts a recording
    on each connection. Other paths send a .txt the same way."""

    body: bytes = b""
    text: bytes = b"just some notes\n" * 200
    hits = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits += 1
        body = self.body if self.path.endswith(".ts") else self.text
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t" if self.path.endswith(".ts") else "application/octet-stream")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def restarting(media: dict[str, Path]):
    handler = type("Handler", (_Restarting,), {"body": media["ts"].read_bytes(), "hits": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.live
def test_http_stream_that_restarts_at_its_beginning_is_not_replayed(daemon: Daemon, restarting) -> None:
    base, handler = restarting
    key = daemon.create_key("restarting")
    reply = _start(daemon, key, f"{base}/live.ts")
    assert reply.status == 200, reply.body
    task_id = reply.body["data"]["task_id"]
    view = daemon.wait_stopped(task_id, key, timeout=NO_DATA_TIMEOUT + 20)
    assert view["status"] == 15 and "replays video already delivered" in view["message"], view
    assert handler.hits >= 3, handler.hits  # it did reconnect (more than the probe and one read)
    segments = _segments(daemon.records(task_id, key))
    media_seconds = sum(float(s["end_time"]) - float(s["start_time"]) for s in segments)
    assert media_seconds == pytest.approx(4.0, abs=0.1), segments  # the 4 s source, once


@pytest.mark.live
def test_text_that_passes_the_probe_ends_cleanly(daemon: Daemon, restarting) -> None:
    base, _ = restarting
    key = daemon.create_key("text-stream")
    reply = _start(daemon, key, f"{base}/notes.txt")  # no length, octet-stream: the probe cannot tell
    assert reply.status == 200, reply.body
    task_id = reply.body["data"]["task_id"]
    view = daemon.wait_stopped(task_id, key, timeout=NO_DATA_TIMEOUT + 20)
    assert view["status"] == 15, view
    assert "no video stream to moderate" in view["message"] or "not a readable" in view["message"], view
    assert "Traceback" not in daemon.logs() and "UnknownCodecError" not in daemon.logs()
