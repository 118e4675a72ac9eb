"""Smoke tests for tests/live_servers.py: real RTMP / RTSP / HLS servers on loopback,
read with PyAV.  No streamguard code involved.  Needs .ci/system-deps.sh."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import av
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402

pytestmark = [
    pytest.mark.live,
    pytest.mark.timeout(60),
]

W, H, FPS = 320, 240, 25
LOOP_S = 4.0  # test file length; publishers loop it
RED = [(0.0, 2.0)]  # red section covers the start of the file
RTSP_TCP = {"rtsp_transport": "tcp"}


@pytest.fixture(scope="module")
def loop_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ls.make_test_video(tmp_path_factory.mktemp("live") / "loop.mp4", seconds=LOOP_S,
                              fps=FPS, width=W, height=H, gop=FPS, red_ranges=RED)


def decode_frames(container, n: int, budget_s: float) -> list[tuple[int, int, bool]]:
    """Decode up to ``n`` video frames within ``budget_s``: (width, height, is_red)."""
    out: list[tuple[int, int, bool]] = []
    deadline = time.monotonic() + budget_s
    for frame in container.decode(video=0):
        out.append((frame.width, frame.height, ls.is_red(frame)))
        if len(out) >= n or time.monotonic() > deadline:
            break
    return out


def check_live_frames(frames: list[tuple[int, int, bool]]) -> None:
    # > one loop of the file (4 s): whatever the join point, both red and pattern show up.
    assert len(frames) >= int((LOOP_S + 0.4) * FPS), f"only {len(frames)} frames"
    assert {(w, h) for w, h, _ in frames} == {(W, H)}
    reds = sum(r for _, _, r in frames)
    assert reds >= FPS, f"expected >=1 s of saturated red frames, got {reds}"
    assert reds < len(frames), "pattern frames missing"


def drain_until_dead(container, limit_s: float) -> tuple[str, float]:
    """Keep reading after the source died: returns ('error'|'eof', seconds)."""
    t0 = time.monotonic()
    try:
        for _ in container.demux():
            assert time.monotonic() - t0 < limit_s, "stream still delivering after source died"
    except av.FFmpegError:
        return "error", time.monotonic() - t0
    return "eof", time.monotonic() - t0


def test_make_test_video(tmp_path: Path) -> None:
    p = ls.make_test_video(tmp_path / "a.mp4", seconds=2, gop=10, red_ranges=[(0.4, 1.0)])
    q = ls.make_test_video(tmp_path / "b.mp4", seconds=2, gop=10, red_ranges=[(0.4, 1.0)])
    assert p.read_bytes() == q.read_bytes()  # deterministic
    with av.open(str(p)) as c:
        assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
        frames = list(c.decode(video=0))
    assert len(frames) == 50
    assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 10, 20, 30, 40]
    assert [i for i, f in enumerate(frames) if ls.is_red(f)] == list(range(10, 25))


def test_rtmp_live(loop_video: Path) -> None:
    with ls.RtmpServer() as srv, ls.Publisher(loop_video, srv.url("cam1")) as pub:
        with av.open(srv.url("cam1"), timeout=(5, 3)) as c:
            assert {s.type for s in c.streams} == {"video", "audio"}
            check_live_frames(decode_frames(c, int((LOOP_S + 0.5) * FPS), 15))

            # Publisher vanishes abruptly -> the reader errors (read timeout) or ends.
            pub.stop()
            how, took = drain_until_dead(c, 12)
            assert took < 12, (how, took)

        # Reconnect: publish again under the same key and read again.
        pub.start()
        with av.open(srv.url("cam1"), timeout=(5, 5)) as c:
            assert len(decode_frames(c, 10, 10)) == 10

        # Server restart keeps its port (readiness = real RTMP handshake).
        port = srv.port
        srv.stop()
        assert not srv.running
        srv.start()
        assert srv.port == port and srv.running


def test_rtsp_tcp_live() -> None:
    with ls.RtspServer(red_ranges=RED, loop_seconds=LOOP_S) as srv:
        assert srv.url.startswith("rtsp://127.0.0.1:") and srv.url.endswith("/test")
        with av.open(srv.url, options=RTSP_TCP, timeout=(5, 5)) as c:
            assert {s.type for s in c.streams} == {"video", "audio"}
            frames = decode_frames(c, int((LOOP_S + 0.5) * FPS), 15)
            check_live_frames(frames)
            assert frames[0][2], "each client starts at t=0, inside the red range"

            srv.stop()  # server killed -> reader ends/errors quickly
            how, took = drain_until_dead(c, 12)
            assert took < 12, (how, took)

        srv.start()  # same port again
        with av.open(srv.url, options=RTSP_TCP, timeout=(5, 5)) as c:
            assert len(decode_frames(c, 10, 10)) == 10


def test_rtsp_file_source(loop_video: Path) -> None:
    """RTSP served from a file (no pattern), read over TCP; the stream ends at EOF."""
    with ls.RtspServer(source_file=loop_video) as srv:
        with av.open(srv.url, options=RTSP_TCP, timeout=(5, 5)) as c:
            frames = decode_frames(c, 1000, 15)
    assert len(frames) >= int(LOOP_S * FPS) - 5
    assert sum(r for *_, r in frames) >= int(1.5 * FPS)


def test_hls_live(loop_video: Path) -> None:
    with ls.HlsLiveSource(loop_video) as hls:
        assert hls.url.endswith("/live.m3u8")
        with av.open(hls.url, timeout=(5, 3)) as c:
            check_live_frames(decode_frames(c, int((LOOP_S + 0.5) * FPS), 15))

            hls.stop_publisher()  # playlist goes stale -> reader errors or ends
            how, took = drain_until_dead(c, 20)
            assert took < 20, (how, took)


@pytest.mark.parametrize("scheme", ["rtmp", "rtsp"])
def test_silent_server_open_times_out(scheme: str) -> None:
    with ls.SilentServer() as silent:
        url = silent.url(scheme, "/live/x" if scheme == "rtmp" else "/test")
        opts = RTSP_TCP if scheme == "rtsp" else {}
        t0 = time.monotonic()
        with pytest.raises(av.FFmpegError):
            av.open(url, options=opts, timeout=(1.5, 1.5))
        took = time.monotonic() - t0
        assert silent.accepted >= 1
    assert 1.0 <= took < 4.0, took


@pytest.mark.parametrize("scheme", ["rtmp", "rtsp", "http"])
def test_closed_port_refused(scheme: str) -> None:
    port = ls.closed_port()
    url = {"rtmp": f"rtmp://127.0.0.1:{port}/live/x", "rtsp": f"rtsp://127.0.0.1:{port}/test",
           "http": f"http://127.0.0.1:{port}/live.m3u8"}[scheme]
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        av.open(url, options=RTSP_TCP if scheme == "rtsp" else {}, timeout=(3, 3))
    assert time.monotonic() - t0 < 1.0


def test_no_orphans_after_failure(loop_video: Path) -> None:
    """Whole process groups (nginx master + worker, ffmpeg) die even when the body raises."""
    groups: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with ls.RtmpServer() as srv, ls.Publisher(loop_video, srv.url("x")) as pub:
            groups = [srv.proc.pid, pub.proc.pid]
            assert len(_group_members(srv.proc.pid)) >= 2  # master + worker
            raise RuntimeError("boom")
    for pgid in groups:
        assert _group_members(pgid) == [], pgid


def test_readiness_failure_reports_logs(loop_video: Path) -> None:
    with ls.RtmpServer() as srv:
        bad = ls.Publisher(loop_video, srv.url("x"), extra_args=["-bogus_option", "1"],
                           ready_timeout=5)
        with pytest.raises(ls.LiveServerError, match="bogus_option"):
            with bad:
                pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    members = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(d.name))
    return members
