"""A real `streamguard serve` process for tests, and a tiny JSON client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def data(self) -> Any:
        return self.body["data"]

    @property
    def error(self) -> dict:
        return self.body["error"]


def request(base: str, method: str, path: str, body: Any = None, *, key: str | None = None,
            raw: bytes | None = None, content_type: str = "application/json", timeout: float = 30) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload, hdrs = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, payload, hdrs = exc.code, exc.read(), dict(exc.headers)
    ctype = hdrs.get("Content-Type", "")
    parsed: Any = json.loads(payload) if payload and "json" in ctype else payload
    return Reply(status, parsed, hdrs)


def wait_for(predicate, timeout: float, what: str, logs, interval: float = 0.25):
    """`predicate()` once it is truthy; an AssertionError with `logs()` (the daemons' logs) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n--- daemon log ---\n{logs()}")


# Tests publish their sources on loopback, which the source address rules refuse
# by default; a test of those rules passes STREAMGUARD_SOURCES__ALLOW_PRIVATE=false.
DEFAULT_ENV = {"STREAMGUARD_SOURCES__ALLOW_PRIVATE": "true"}


class Daemon:
    """`python -m streamguard serve` on a free loopback port with its own data dir.
    `env` adds STREAMGUARD_* overrides (e.g. short timeouts for tests) to DEFAULT_ENV."""

    def __init__(self, data_dir: Path, bundle: Path, env: dict[str, str] | None = None, *,
                 log_name: str = "daemon.log") -> None:
        self.data_dir = Path(data_dir)
        self.bundle = bundle
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / log_name  # nodes of a cluster may share a data dir

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streamguard", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})

    def create_key(self, project: str, balance: int | None = None) -> str:
        args = ["keys", "create", "--project", project] + (["--balance", str(balance)] if balance is not None else [])
        res = self.cli(*args)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 30, *, until: str = "/readyz") -> "Daemon":
        """Start and wait for `until` to answer 200 (`/healthz` for a daemon
        that is up but not meant to be ready: broken model, full disk)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamguard", "serve", "--port", str(self.port), "--data-dir",
             str(self.data_dir), "--model", str(self.bundle)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if request(self.base, "GET", until, timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"daemon not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = None, **kw: Any) -> Reply:
        return request(self.base, method, path, body, key=key, **kw)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.25):
        return wait_for(predicate, timeout, what, self.logs, interval)

    def records(self, task_id: str, key: str) -> list[dict]:
        reply = self.call("GET", f"/v1/streams/{task_id}/records?limit=1000", key=key)
        assert reply.status == 200, reply.body
        return reply.data["items"]

    def wait_stopped(self, task_id: str, key: str, timeout: float) -> dict:
        return self.wait_for(lambda: (lambda t: t if t["state"] == "stopped" else None)(
            self.call("GET", f"/v1/streams/{task_id}", key=key).data), timeout, f"task {task_id} to stop")
