"""Real live-streaming servers and publishers on loopback, for integration tests.

Plain importable module (not a conftest).  Everything here starts REAL programs:

* :class:`RtmpServer`     - nginx + Debian's RTMP module (libnginx-mod-rtmp)
* :class:`Publisher`      - ``ffmpeg -re -stream_loop -1 -i FILE -c copy -f flv|rtsp URL``
* :class:`RtspServer`     - GStreamer's gst-rtsp-server via ``tests/rtsp_server.py``
                            run with Debian's ``/usr/bin/python3`` (python3-gi)
* :class:`HlsLiveSource`  - ffmpeg writing a live HLS playlist + a threaded stdlib HTTP server
* :class:`SilentServer`   - TCP listener that accepts and never sends a byte
* :func:`closed_port`     - a loopback port with nothing listening
* :func:`make_test_video` - deterministic H.264/AAC test file (PyAV) with red sections

System packages: ``.ci/system-deps.sh``.  :func:`missing_tools` tells which external
programs are absent (conftest fails live tests then, naming what to install).

Conventions: everything binds 127.0.0.1 only; every wait polls with a deadline (no
blind sleeps); child processes run in their own session (``start_new_session=True``)
and are SIGKILLed as a process group on exit (context-manager exit, ``close()``,
garbage collection via ``weakref.finalize``, interpreter exit via ``atexit``; children
spawned from the main thread also get ``PR_SET_PDEATHSIG``).  Child stdout/stderr go
to log files in the object's temp dir and are quoted in :class:`LiveServerError` when
a readiness check fails.  Set ``STREAMGUARD_KEEP_LIVE_TMP=1`` to keep the temp dirs.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import ctypes
import errno
import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "LiveServerError",
    "FFMPEG",
    "NGINX",
    "SYSTEM_PYTHON",
    "RTMP_MODULE",
    "RTSP_HELPER",
    "missing_tools",
    "free_port",
    "closed_port",
    "wait_until",
    "make_test_video",
    "is_red",
    "RtmpServer",
    "Publisher",
    "RtspServer",
    "HlsLiveSource",
    "SilentServer",
]

LOOPBACK = "127.0.0.1"
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "/usr/sbin/nginx"
SYSTEM_PYTHON = "/usr/bin/python3"
RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
RTSP_HELPER = Path(__file__).with_name("rtsp_server.py")

_KEEP_TMP = os.environ.get("STREAMGUARD_KEEP_LIVE_TMP", "") not in ("", "0")


class LiveServerError(RuntimeError):
    """A live server/publisher failed to start or become ready (message has its logs)."""


# --------------------------------------------------------------------------- tools


def missing_tools(*kinds: str) -> list[str]:
    """Names of missing external pieces for ``kinds`` in {"ffmpeg","rtmp","rtsp"}.

    Empty list = everything needed is installed.
    """
    kinds = kinds or ("ffmpeg", "rtmp", "rtsp")
    missing: list[str] = []
    if "ffmpeg" in kinds and not os.access(FFMPEG, os.X_OK):
        missing.append("ffmpeg")
    if "rtmp" in kinds:
        if not os.access(NGINX, os.X_OK):
            missing.append("nginx")
        if not os.path.exists(RTMP_MODULE):
            missing.append("libnginx-mod-rtmp")
    if "rtsp" in kinds:
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            missing.append(SYSTEM_PYTHON)
        else:
            probe = (
                "import gi; gi.require_version('GstRtspServer','1.0');"
                "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
                "import sys; m=[e for e in ('x264enc','rtph264pay','h264parse','avenc_aac',"
                "'rtpmp4gpay','videotestsrc','audiotestsrc') if Gst.ElementFactory.find(e) is None];"
                "print(' '.join(m)); sys.exit(1 if m else 0)"
            )
            try:
                r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True,
                                   text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                missing.append(f"gst-rtsp-server ({exc})")
            else:
                if r.returncode != 0:
                    lines = (r.stdout.strip() or r.stderr.strip() or "?").splitlines()
                    missing.append(f"gst-rtsp-server/plugins ({lines[-1]})")
    return missing


# --------------------------------------------------------------------------- ports & waiting


def free_port() -> int:
    """A currently-free TCP port on 127.0.0.1 (bind :0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback TCP port with nothing listening (connecting gives ECONNREFUSED)."""
    for _ in range(20):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((LOOPBACK, port)) == errno.ECONNREFUSED:
                return port
    raise LiveServerError("could not find a closed loopback port")


def wait_until(predicate: Callable[[], object], timeout: float, *, interval: float = 0.05,
               what: str = "condition", check: Callable[[], None] | None = None) -> object:
    """Poll ``predicate`` until truthy (returned) or ``timeout`` s elapse (LiveServerError).

    ``check`` runs each round and may raise early (e.g. "process died").
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LiveServerError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _tcp_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _rtmp_handshake_ok(port: int, timeout: float = 1.0) -> bool:
    """Do a real RTMP handshake (C0+C1 -> S0+S1+S2): proves an nginx worker serves RTMP."""
    c1 = bytes(8) + bytes((i * 7 + 3) & 0xFF for i in range(1528))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"\x03" + c1)
            need, got = 1 + 1536 + 1536, 0
            while got < need:
                chunk = s.recv(need - got)
                if not chunk:
                    return False
                if got == 0 and chunk[0] != 3:
                    return False
                got += len(chunk)
            return True
    except OSError:
        return False


def _rtsp_options_ok(port: int, path: str, timeout: float = 1.0) -> bool:
    """Send RTSP OPTIONS and expect ``RTSP/1.0 200``."""
    req = (f"OPTIONS rtsp://{LOOPBACK}:{port}{path} RTSP/1.0\r\nCSeq: 1\r\n"
           "User-Agent: live_servers\r\n\r\n").encode()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(req)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"RTSP/1.0 200")
    except OSError:
        return False


# --------------------------------------------------------------------------- processes

_LIVE_PROCS: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGKILL the whole process group of ``proc`` (own session) and reap it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with _LIVE_LOCK:
        _LIVE_PROCS.discard(proc)


@atexit.register
def _kill_all_live() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE_PROCS)
    for p in procs:
        _kill_group(p, timeout=2.0)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(cmd: Sequence[str], log_path: Path, *, cwd: str | Path | None = None,
           env: dict | None = None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``cmd`` in its own session with stdout+stderr appended to ``log_path``."""
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use it
    # from the main thread (whose death == the test process's death).
    preexec = _pdeathsig if threading.current_thread() is threading.main_thread() else None
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec, close_fds=True,
        )
    with _LIVE_LOCK:
        _LIVE_PROCS.add(proc)
    return proc


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"<no log {path}: {exc}>"
    text = data[-limit:].decode("utf-8", "replace")
    return ("...\n" if len(data) > limit else "") + text


def _cleanup(procs: list, tmpdir: str | None, keep: bool) -> None:
    for p in procs:
        _kill_group(p)
    if tmpdir and not keep:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _Managed:
    """Temp dir + child processes + context manager + finalizer plumbing."""

    _prefix = "sg-live-"

    def __init__(self, keep_tmp: bool | None = None) -> None:
        self.keep_tmp = _KEEP_TMP if keep_tmp is None else keep_tmp
        self.tmpdir = Path(tempfile.mkdtemp(prefix=self._prefix))
        self._procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, str(self.tmpdir),
                                           self.keep_tmp)

    def _track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs[:] = [p for p in self._procs if p.poll() is None]
        self._procs.append(proc)
        return proc

    def _untrack_kill(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        _kill_group(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        """Kill every child process group and remove the temp dir (idempotent)."""
        self._finalizer()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


def _died_check(proc: subprocess.Popen, what: str, logs: Iterable[Path]) -> Callable[[], None]:
    def check() -> None:
        if proc.poll() is not None:
            raise LiveServerError(
                f"{what} exited early with code {proc.returncode}\n" + _logs_text(logs))
    return check


def _logs_text(logs: Iterable[Path]) -> str:
    return "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in logs if Path(p).exists())


# --------------------------------------------------------------------------- test video


def make_test_video(path: str | os.PathLike, seconds: float = 20.0, fps: int = 25,
                    width: int = 320, height: int = 240, gop: int | None = None,
                    red_ranges: Sequence[tuple[float, float]] = ((10.0, 15.0),),
                    audio: bool = True) -> Path:
    """A deterministic live-friendly test file (container from the suffix): the
    project's test video (tests/videos.py) with 1 s GOPs by default and no
    B-frames, as live encoders send."""
    from videos import make_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_video(path, seconds=seconds, fps=fps, width=width, height=height, gop=int(gop or fps),
                      red=tuple((float(a), float(b)) for a, b in red_ranges), audio=audio, bframes=0)


def is_red(frame, *, min_r: float = 200.0, max_gb: float = 55.0) -> bool:
    """True when a decoded ``av.VideoFrame`` (or HxWx3 RGB array) is saturated red."""
    import numpy as np

    arr = frame if isinstance(frame, np.ndarray) else frame.to_ndarray(format="rgb24")
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    return r >= min_r and g <= max_gb and b <= max_gb


# --------------------------------------------------------------------------- RTMP (nginx)

_NGINX_CONF = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
rtmp {{
    access_log {tmp}/rtmp_access.log;
    server {{
        listen {host}:{port};
        chunk_size 4096;
        ping 3s;
        ping_timeout 3s;
        application {app} {{
            live on;
            record off;
            drop_idle_publisher 5s;
        }}
    }}
}}
"""


class _ServerProcess(_Managed):
    """A managed server that is one process group (`self.proc`)."""

    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        """SIGKILL the server's process group (clients see their connections drop)."""
        self._untrack_kill(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RtmpServer(_ServerProcess):
    """nginx + Debian's RTMP module, in a temp prefix dir, on a free loopback port.

    ``stop()`` SIGKILLs nginx (master + worker); ``start()`` brings it back on the
    same port.  Readiness = a real RTMP handshake answered by the worker.

    >>> with RtmpServer() as srv:
    ...     srv.url("cam1")  # rtmp://127.0.0.1:PORT/live/cam1
    """

    _prefix = "sg-rtmp-"

    def __init__(self, *, app: str = "live", startup_timeout: float = 10.0,
                 nginx: str = NGINX, module: str = RTMP_MODULE,
                 keep_tmp: bool | None = None) -> None:
        super().__init__(keep_tmp)
        self.app = app
        self.startup_timeout = startup_timeout
        self.nginx = nginx
        self.module = module
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.conf_path = self.tmpdir / "nginx.conf"
        self.error_log = self.tmpdir / "error.log"
        self.stdout_log = self.tmpdir / "nginx.stdout.log"

    def url(self, stream_key: str = "test") -> str:
        if self.port is None:
            raise LiveServerError("RtmpServer not started")
        return f"rtmp://{LOOPBACK}:{self.port}/{self.app}/{stream_key}"

    def logs(self) -> str:
        return _logs_text([self.stdout_log, self.error_log, self.tmpdir / "rtmp_access.log"])

    def start(self) -> "RtmpServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        # First start: a free port (retried if someone grabs it first).  Restart after
        # stop(): the SAME port again (nginx uses SO_REUSEADDR), retried until timeout.
        fixed = self.port
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        for attempt in range(1000):
            if attempt and (time.monotonic() >= deadline or (fixed is None and attempt >= 3)):
                break
            port = fixed or free_port()
            self.conf_path.write_text(_NGINX_CONF.format(
                module=self.module, tmp=self.tmpdir, host=LOOPBACK, port=port, app=self.app))
            self.error_log.write_bytes(b"")
            proc = self._track(_spawn(
                [self.nginx, "-p", f"{self.tmpdir}/", "-e", str(self.error_log),
                 "-c", str(self.conf_path)], self.stdout_log, cwd=self.tmpdir))
            try:
                wait_until(lambda: _rtmp_handshake_ok(port),
                           max(0.5, deadline - time.monotonic()),
                           what=f"nginx-rtmp handshake on {LOOPBACK}:{port}",
                           check=_died_check(proc, "nginx", [self.stdout_log, self.error_log]))
            except LiveServerError as exc:
                self._untrack_kill(proc)
                last = exc
                if "Address already in use" in self.logs():
                    time.sleep(0.1)
                    continue
                raise LiveServerError(f"{exc}\n{self.logs()}") from None
            self.proc, self.port = proc, port
            return self
        raise LiveServerError(f"nginx could not bind a port: {last}")


# --------------------------------------------------------------------------- publisher (ffmpeg)


class Publisher(_Managed):
    """``ffmpeg -re -stream_loop -1 -i SOURCE -c copy -f flv|rtsp URL`` as a live publisher.

    ``stop()`` SIGKILLs it (abrupt vanish, no FCUnpublish/TEARDOWN);
    ``stop(graceful=True)`` sends SIGINT so ffmpeg closes the session cleanly;
    ``start()`` again reconnects.  ``start()`` waits until ffmpeg reports progress
    (packets actually written to the server) unless ``wait=False``.
    """

    _prefix = "sg-pub-"

    def __init__(self, source: str | os.PathLike, url: str, *, fmt: str | None = None,
                 realtime: bool = True, loop: bool = True, codec_args: Sequence[str] = ("-c", "copy"),
                 extra_args: Sequence[str] = (), ready_timeout: float = 10.0,
                 keep_tmp: bool | None = None) -> None:
        super().__init__(keep_tmp)
        self.source = Path(source)
        self.url = url
        if fmt is None:
            fmt = "rtsp" if url.startswith("rtsp://") else "flv"
        self.fmt = fmt
        self.realtime, self.loop = realtime, loop
        self.codec_args, self.extra_args = list(codec_args), list(extra_args)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmpdir / "ffmpeg.log"
        self.progress_path = self.tmpdir / "progress.txt"
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "info", "-nostats",
               "-progress", str(self.progress_path), "-stats_period", "0.2"]
        if self.realtime:
            cmd.append("-re")
        if self.loop:
            cmd += ["-stream_loop", "-1"]
        cmd += ["-i", str(self.source), *self.codec_args, *self.extra_args]
        if self.fmt == "rtsp":
            cmd += ["-f", "rtsp", "-rtsp_transport", "tcp"]
        else:
            cmd += ["-f", self.fmt]
        cmd.append(self.url)
        return cmd

    def _progress_started(self) -> bool:
        try:
            text = self.progress_path.read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, val = line.partition("=")
            if key in ("total_size",) and val.strip().isdigit() and int(val) > 0:
                return True
            if key == "out_time_us" and val.strip().lstrip("-").isdigit() and int(val) > 0:
                return True
        return False

    def start(self, wait: bool = True) -> "Publisher":
        if self.running:
            return self
        self.progress_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as fh:
            fh.write(f"\n===== start #{self.starts + 1} at {time.time():.3f}\n".encode())
        self.proc = self._track(_spawn(self.command(), self.log_path, cwd=self.tmpdir))
        self.starts += 1
        if wait:
            try:
                wait_until(self._progress_started, self.ready_timeout,
                           what=f"ffmpeg publishing to {self.url}",
                           check=_died_check(self.proc, "ffmpeg publisher", [self.log_path]))
            except LiveServerError as exc:
                self.stop()
                raise LiveServerError(f"{exc}\n{_logs_text([self.log_path])}") from None
        return self

    def stop(self, graceful: bool = False, timeout: float = 5.0) -> None:
        """Make the publisher vanish: SIGKILL its process group (or SIGINT if graceful)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if graceful and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        self._untrack_kill(proc)

    def restart(self, wait: bool = True) -> "Publisher":
        self.stop()
        return self.start(wait=wait)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return _logs_text([self.log_path])


# --------------------------------------------------------------------------- RTSP (GStreamer)


class RtspServer(_ServerProcess):
    """GStreamer RTSP server (tests/rtsp_server.py under /usr/bin/python3).

    Serves ``rtsp://127.0.0.1:PORT/test`` (TCP and UDP transports): a live endless
    x264 stream of a moving SMPTE pattern, saturated red for times in ``red_ranges``
    (seconds, modulo ``loop_seconds`` when given), + AAC tone unless ``audio=False``.
    Each client's time starts at 0 unless ``shared=True``.
    With ``source_file`` it instead serves that .mp4/.ts (H.264 [+AAC]) once, in real time.

    ``stop()`` SIGKILLs the server; ``start()`` brings it back on the SAME port.
    """

    _prefix = "sg-rtsp-"

    def __init__(self, *, port: int | None = None, mount: str = "/test", fps: int = 25,
                 width: int = 320, height: int = 240, gop: int | None = None,
                 red_ranges: Sequence[tuple[float, float]] = (),
                 loop_seconds: float | None = None, audio: bool = True,
                 shared: bool = False, source_file: str | os.PathLike | None = None,
                 python: str = SYSTEM_PYTHON, startup_timeout: float = 15.0,
                 keep_tmp: bool | None = None) -> None:
        super().__init__(keep_tmp)
        self.port = port
        self.mount = mount if mount.startswith("/") else "/" + mount
        self.fps, self.width, self.height = fps, width, height
        self.gop = int(gop or fps)
        self.red_ranges = [(float(a), float(b)) for a, b in red_ranges]
        self.loop_seconds = loop_seconds
        self.audio, self.shared = audio, shared
        self.source_file = Path(source_file) if source_file else None
        self.python = python
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmpdir / "rtsp_server.log"
        self.ready_path = self.tmpdir / "ready"

    @property
    def url(self) -> str:
        if self.port is None:
            raise LiveServerError("RtspServer not started")
        return f"rtsp://{LOOPBACK}:{self.port}{self.mount}"

    def command(self, port: int) -> list[str]:
        cmd = [self.python, str(RTSP_HELPER), "--host", LOOPBACK, "--port", str(port),
               "--mount", self.mount, "--fps", str(self.fps), "--width", str(self.width),
               "--height", str(self.height), "--gop", str(self.gop),
               "--ready-file", str(self.ready_path)]
        for a, b in self.red_ranges:
            cmd += ["--red", f"{a}:{b}"]
        if self.loop_seconds:
            cmd += ["--loop-seconds", str(self.loop_seconds)]
        if not self.audio:
            cmd.append("--no-audio")
        if self.shared:
            cmd.append("--shared")
        if self.source_file is not None:
            cmd += ["--file", str(self.source_file)]
        return cmd

    def _read_ready(self) -> int | None:
        try:
            text = self.ready_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def start(self) -> "RtspServer":
        if self.running:
            return self
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self.ready_path.unlink(missing_ok=True)
            with open(self.log_path, "ab") as fh:
                fh.write(f"\n===== start at {time.time():.3f}\n".encode())
            # Port 0 on first start: the helper binds and reports it (no race).
            proc = self._track(_spawn(self.command(self.port or 0), self.log_path,
                                      cwd=self.tmpdir))
            check = _died_check(proc, "rtsp_server.py", [self.log_path])
            try:
                port = wait_until(self._read_ready, max(0.1, deadline - time.monotonic()),
                                  what="rtsp_server.py ready file", check=check)
                wait_until(lambda: _rtsp_options_ok(port, self.mount),
                           max(0.1, deadline - time.monotonic()),
                           what=f"RTSP OPTIONS 200 on {LOOPBACK}:{port}", check=check)
            except LiveServerError as exc:
                self._untrack_kill(proc)
                # Restart on a fixed port may briefly fail to bind; retry until deadline.
                if (self.port and "failed to bind" in _tail(self.log_path, 300)
                        and time.monotonic() < deadline):
                    time.sleep(0.1)
                    continue
                raise LiveServerError(f"{exc}\n{_logs_text([self.log_path])}") from None
            self.proc, self.port = proc, port
            return self

    def logs(self) -> str:
        return _logs_text([self.log_path])


# --------------------------------------------------------------------------- HLS


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t",
                      ".m4s": "video/iso.segment", ".mp4": "video/mp4"}

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache, no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def handle(self) -> None:  # readers disconnecting mid-segment are normal
        with contextlib.suppress(ConnectionError, BrokenPipeError, socket.timeout):
            super().handle()


class _HttpServerThread:
    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.5
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1},
                                       name=f"hls-http-{self.port}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class HlsLiveSource(_Managed):
    """ffmpeg writing a live HLS playlist from the looped ``source`` (``-re``) into a
    temp dir, served by a threaded stdlib HTTP server at ``.url`` =
    ``http://127.0.0.1:PORT/live.m3u8``.

    ``start()`` waits for the playlist to list ``min_segments`` segments and be
    fetchable over HTTP.  ``stop_publisher()`` SIGKILLs ffmpeg (playlist goes stale,
    no ENDLIST), ``start_publisher()`` restarts it; ``stop()`` stops both.
    """

    _prefix = "sg-hls-"

    def __init__(self, source: str | os.PathLike, *, hls_time: float = 1.0,
                 list_size: int = 6, min_segments: int = 2, realtime: bool = True,
                 loop: bool = True, codec_args: Sequence[str] = ("-c", "copy"),
                 extra_args: Sequence[str] = (), startup_timeout: float = 15.0,
                 keep_tmp: bool | None = None) -> None:
        super().__init__(keep_tmp)
        self.source = Path(source)
        self.hls_time, self.list_size, self.min_segments = hls_time, list_size, min_segments
        self.realtime, self.loop = realtime, loop
        self.codec_args, self.extra_args = list(codec_args), list(extra_args)
        self.startup_timeout = startup_timeout
        self.www = self.tmpdir / "www"
        self.www.mkdir()
        self.playlist_path = self.www / "live.m3u8"
        self.log_path = self.tmpdir / "ffmpeg.log"
        self.proc: subprocess.Popen | None = None
        self._http: _HttpServerThread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise LiveServerError("HlsLiveSource not started")
        return f"http://{LOOPBACK}:{self.port}/live.m3u8"

    def command(self) -> list[str]:
        cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "info", "-nostats"]
        if self.realtime:
            cmd.append("-re")
        if self.loop:
            cmd += ["-stream_loop", "-1"]
        cmd += ["-i", str(self.source), *self.codec_args, *self.extra_args,
                "-f", "hls", "-hls_time", str(self.hls_time),
                "-hls_list_size", str(self.list_size),
                "-hls_flags", "delete_segments+temp_file",
                "-hls_segment_filename", str(self.www / "seg%05d.ts"),
                str(self.playlist_path)]
        return cmd

    def _segments_listed(self) -> int:
        try:
            text = self.playlist_path.read_text()
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if line.startswith("#EXTINF"))

    def _http_ok(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(self.url, timeout=1.0) as resp:
                return resp.status == 200 and b"#EXTM3U" in resp.read()
        except OSError:
            return False

    def start_publisher(self, wait: bool = True) -> "HlsLiveSource":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log_path, "ab") as fh:
            fh.write(f"\n===== start at {time.time():.3f}\n".encode())
        before = self._segments_listed()
        self.proc = self._track(_spawn(self.command(), self.log_path, cwd=self.www))
        if wait:
            # A restarted ffmpeg rewrites the playlist from scratch.
            need = self.min_segments
            try:
                wait_until(lambda: self._segments_listed() >= need, self.startup_timeout,
                           what=f"{need} HLS segments in {self.playlist_path.name}",
                           check=_died_check(self.proc, "ffmpeg hls", [self.log_path]))
            except LiveServerError as exc:
                self.stop_publisher()
                raise LiveServerError(f"{exc} (had {before})\n{self.logs()}") from None
        return self

    def stop_publisher(self) -> None:
        """SIGKILL the HLS writer; the playlist stays but stops advancing."""
        self._untrack_kill(self.proc)
        self.proc = None

    def start(self) -> "HlsLiveSource":
        if self._http is None:
            self._http = _HttpServerThread(self.www)
            self.port = self._http.port
            self._finalizer_http = weakref.finalize(self, self._http.close)
        self.start_publisher(wait=True)
        wait_until(self._http_ok, 5.0, what=f"HTTP GET {self.url}")
        return self

    def stop(self) -> None:
        self.stop_publisher()
        if self._http is not None:
            self._http.close()
            self._http = None

    def close(self) -> None:
        self.stop()
        super().close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return _logs_text([self.log_path])


# --------------------------------------------------------------------------- silent TCP


class SilentServer:
    """TCP server on 127.0.0.1 that accepts connections and never sends a byte.

    Accepted sockets are held open (never read from or written to) until ``close()``.
    ``url(scheme, path)`` builds e.g. ``rtmp://127.0.0.1:PORT/live/x``.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.accepted = 0

    def start(self) -> "SilentServer":
        if self._sock is not None:
            return self
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LOOPBACK, 0))
        s.listen(16)
        s.settimeout(0.1)
        self._sock, self.port = s, s.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"silent-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(conn)
            self.accepted += 1

    def url(self, scheme: str = "rtmp", path: str = "/live/silent") -> str:
        if self.port is None:
            raise LiveServerError("SilentServer not started")
        return f"{scheme}://{LOOPBACK}:{self.port}{path}"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._conns.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "SilentServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # manual smoke: python tests/live_servers.py
    print("missing:", missing_tools() or "nothing", file=sys.stderr)


@contextlib.contextmanager
def publishing(video: str | os.PathLike, rtmp: "RtmpServer", name: str):
    """A started ffmpeg publisher of `video` on its own stream key (from a test
    name); yields (publisher, url) and closes it afterwards."""
    pub = Publisher(video, rtmp.url(re.sub(r"\W", "_", name)[:40]))
    pub.start()
    try:
        yield pub, pub.url
    finally:
        pub.close()
