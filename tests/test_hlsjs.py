"""The HLS output of `streamguard scan` plays in hls.js (the contract: playlists play
in ffmpeg/ffprobe *and* in hls.js).

A real browser, not a mock: Debian's Chromium (headless) loads hls.js (pinned,
fetched once per machine from the npm registry with `npm pack`, checked against
its registry integrity hash) and plays master.m3u8 served from loopback in a
muted <video>. The page (tests/hlsjs/player.html) reports every hls.js event of
interest, every hls.js ERROR event (fatal or not), hls.js's own warnings, and the
media element's progress back to the test server with a POST.

Needs `chromium` (bash .ci/system-deps.sh) and `npm` with the registry reachable
on the first run; without them the test fails, it never skips.
"""

from __future__ import annotations

import base64
import hashlib
import json
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from videos import make_video

HLSJS_VERSION = "1.7.4"
# `npm view hls.js@1.7.4 dist.integrity`
HLSJS_INTEGRITY = "sha512-3GlxGdPvT2YHvQYOt+yOzT/DEior/qJVNIylHA77kgeoBTdQQqi70GwefNEUmHQeNGyjC8U62+bruqW/Tpm+tg=="

HERE = Path(__file__).parent
PLAYER_HTML = HERE / "hlsjs" / "player.html"

PAGE_LIMIT_S = 40     # the page gives up and reports by itself after this long
RESULT_WAIT_S = 55    # the test gives up waiting for the page's report after this long

CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".js": "application/javascript",
    ".html": "text/html; charset=utf-8",
    ".jpg": "image/jpeg",
}


def _fail_setup(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


# --------------------------------------------------------------------------- hls.js


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamguard-tests"


def _fetch_hlsjs() -> Path:
    """dist/hls.min.js of the pinned hls.js, cached per machine."""
    target = _cache_dir() / f"hls.js-{HLSJS_VERSION}" / "hls.min.js"
    if target.is_file() and target.stat().st_size > 0:
        return target
    npm = shutil.which("npm")
    if npm is None:
        _fail_setup(f"npm not found: the hls.js test fetches hls.js@{HLSJS_VERSION} from the npm registry "
                    f"with `npm pack` (install Node.js/npm, or put dist/hls.min.js at {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", f"hls.js@{HLSJS_VERSION}", "--json", "--pack-destination", tmp],
                capture_output=True, text=True, timeout=180, cwd=tmp, check=False,
            )
        except subprocess.TimeoutExpired:
            _fail_setup(f"`npm pack hls.js@{HLSJS_VERSION}` timed out after 180 s: is the npm registry reachable?")
        if proc.returncode != 0:
            _fail_setup(f"`npm pack hls.js@{HLSJS_VERSION}` failed (rc={proc.returncode}); is the npm registry "
                        f"reachable?\n{proc.stderr[-2000:]}")
        tarballs = list(Path(tmp).glob("hls.js-*.tgz"))
        if len(tarballs) != 1:
            _fail_setup(f"`npm pack` left {tarballs!r} in {tmp}, expected one hls.js tarball")
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarballs[0].read_bytes()).digest()).decode()
        if digest != HLSJS_INTEGRITY:
            _fail_setup(f"hls.js@{HLSJS_VERSION} tarball integrity {digest} != pinned {HLSJS_INTEGRITY}")
        with tarfile.open(tarballs[0]) as tar:
            member = tar.extractfile("package/dist/hls.min.js")
            if member is None:
                _fail_setup("hls.js tarball has no package/dist/hls.min.js")
            data = member.read()
        partial = Path(tmp) / "hls.min.js"
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: concurrent runs never see half a file
    return target


@pytest.fixture(scope="session")
def hlsjs() -> Path:
    return _fetch_hlsjs()


# --------------------------------------------------------------------------- browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    _fail_setup("chromium not found (needed to play HLS in hls.js): run `bash .ci/system-deps.sh`")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def chromium() -> str:
    return _chromium()


class _Browser:
    """Headless Chromium on one URL; the whole process group dies on close()."""

    def __init__(self, binary: str, url: str, workdir: Path) -> None:
        self.log_path = workdir / "chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the browser
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-quic", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-features=Translate,MediaRouter",
             "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
             "--disable-backgrounding-occluded-windows",
             f"--user-data-dir={workdir / 'profile'}",
             "--autoplay-policy=no-user-gesture-required",
             "--remote-debugging-port=0",  # keeps the headless browser open on the page
             url],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, n: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [l for l in text.splitlines() if "dbus" not in l.lower()]  # no D-Bus in CI: noise
        return "\n".join(lines)[-n:]

    def _signal_and_wait(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self._signal_and_wait(signal.SIGTERM)
        # renderer/GPU/zygote children share the group; make sure none survive
        self._signal_and_wait(signal.SIGKILL)
        self._log.close()


# --------------------------------------------------------------------------- server


class _Server:
    """Loopback HTTP: /hls/* from the scan output, /hls.min.js, /player.html,
    POST /progress and /result from the page."""

    def __init__(self, hls_dir: Path, hlsjs: Path) -> None:
        self.hls_dir = hls_dir.resolve()
        self.hlsjs = hlsjs
        self.result: dict | None = None
        self.progress: dict | None = None
        self.done = threading.Event()
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet; kept in server.requests instead
                pass

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append(f"GET {path}")
                if path == "/player.html":
                    file = PLAYER_HTML
                elif path == "/hls.min.js":
                    file = server.hlsjs
                elif path.startswith("/hls/"):
                    file = (server.hls_dir / path[len("/hls/"):]).resolve()
                    if server.hls_dir not in file.parents:
                        return self._send(403, b"outside the HLS directory")
                elif path == "/favicon.ico":
                    return self._send(204, b"")
                else:
                    return self._send(404, b"not found")
                if not file.is_file():
                    return self._send(404, b"not found")
                self._send(200, file.read_bytes(), CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

            do_HEAD = do_GET

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    data = json.loads(body)
                except ValueError:
                    return self._send(400, b"bad json")
                if path == "/progress":
                    server.progress = data
                elif path == "/result":
                    if server.result is None:
                        server.result = data
                    server.done.set()
                else:
                    return self._send(404, b"not found")
                self._send(204, b"")

        return Handler


def play_in_hlsjs(hls_dir: Path, hlsjs: Path, chromium: str, workdir: Path, playlist: str = "master.m3u8",
                  src: str | None = None) -> dict:
    """Plays hls_dir/playlist in hls.js in headless Chromium; returns the page's report.
    `src`: play this URL instead (another origin, e.g. an S3 bucket: it must answer CORS)."""
    server = _Server(hls_dir, hlsjs)
    browser = None
    try:
        source = urllib.parse.quote(src, safe="") if src else f"/hls/{playlist}"
        url = f"{server.base}/player.html?src={source}&limit_ms={PAGE_LIMIT_S * 1000}"
        browser = _Browser(chromium, url, workdir)
        deadline = time.monotonic() + RESULT_WAIT_S
        while not server.done.wait(timeout=0.5):
            if browser.proc.poll() is not None:
                pytest.fail(f"chromium exited (rc={browser.proc.returncode}) before the page reported; "
                            f"requests: {server.requests}\n{browser.log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no report from the hls.js page within {RESULT_WAIT_S} s; requests: "
                            f"{server.requests}\nlast progress: {json.dumps(server.progress, indent=1)}\n"
                            f"{browser.log_tail()}", pytrace=False)
        result = dict(server.result or {})
        result["_requests"] = list(server.requests)
        result["_browser_log"] = browser.log_tail()
        return result
    finally:
        if browser is not None:
            browser.close()
        server.close()


def _summary(r: dict) -> str:
    """What to show when an assertion fails: the report without the bulky log."""
    slim = {k: v for k, v in r.items() if k not in ("hls_log", "_browser_log")}
    return (json.dumps(slim, indent=1, default=str)
            + "\n--- hls.js log (tail) ---\n" + "\n".join(r.get("hls_log", [])[-60:])
            + "\n--- chromium log (tail) ---\n" + r.get("_browser_log", ""))


def _report_findings(r: dict) -> None:
    """Non-fatal hls.js errors and warnings are findings about our HLS output: print them
    (shown with -rA / -s, and on failure) rather than failing the run."""
    lines = [(f"hls.js {r.get('hlsjs_version')}: reason={r.get('done_reason')} "
              f"elapsed={r.get('elapsed_ms')} ms waiting={r.get('waiting_count')} quality={r.get('quality')}"),
             f"buffer codecs: {r.get('buffer_codecs')}"]
    lines += [f"hls.js ERROR event (non-fatal): {e}" for e in r.get("errors", []) if not e.get("fatal")]
    lines += [f"hls.js warning: {w}" for w in r.get("hls_warnings", [])]
    print("\n".join(lines), file=sys.stderr)


# --------------------------------------------------------------------------- tests


@pytest.mark.live
def test_scan_output_plays_in_hlsjs(tmp_path: Path, cli, hlsjs: Path, chromium: str) -> None:
    video = make_video(tmp_path / "in.mp4", seconds=12, fps=25, gop=50)
    out = tmp_path / "out"
    res = cli("scan", video, "--out", out, "--segment-seconds", "4", "--data-dir", tmp_path / "data")
    assert res.returncode == 0, res.stderr
    segments = sorted(p.name for p in (out / "source").glob("segment_*.ts"))
    assert segments == ["segment_000.ts", "segment_001.ts", "segment_002.ts"], segments

    r = play_in_hlsjs(out, hlsjs, chromium, tmp_path)
    _report_findings(r)
    info = _summary(r)

    assert r.get("hlsjs_version") == HLSJS_VERSION, info
    assert r["mse_h264_aac"] and r["hls_supported"], "this Chromium cannot play H.264/AAC through MSE\n" + info
    assert not r["page_errors"], info
    fatal = [e for e in r["errors"] if e.get("fatal")]
    assert not fatal, f"fatal hls.js errors: {fatal}\n{info}"
    assert r["video_error"] is None, info
    assert r["manifest_parsed"], info
    assert len(r["levels"]) == 1, info
    assert r["level_details"] and r["level_details"][0]["fragments"] == 3, info
    assert sorted({f["sn"] for f in r["frags_loaded"] if f["type"] == "main"}) == [0, 1, 2], info
    assert sorted({f["sn"] for f in r["frags_buffered"] if f["type"] == "main"}) == [0, 1, 2], info
    assert set(r["buffer_codecs"] or {}) >= {"audio", "video"}, info
    assert r["duration"] is not None and abs(r["duration"] - 12.0) <= 0.5, info
    assert r["ended"] or r["max_current_time"] >= 11.0, info
    assert r["max_current_time"] >= 11.0, info
    assert r["done_reason"] == "ended", info
