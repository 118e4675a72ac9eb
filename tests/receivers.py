"""A real webhook receiver on loopback, for delivery tests.

:class:`Receiver` is a stdlib ``ThreadingHTTPServer`` running in a thread on
127.0.0.1. It records every request it gets (path, headers, raw body, arrival
time, the mode it was in) and answers according to a switchable ``mode``:

* ``"ok"``       - 204 No Content
* ``"error"``    - 500
* ``"slow"``     - waits ``slow_seconds`` (set it above the daemon's delivery
                   timeout) and then answers 200, too late to count
* ``"redirect"`` - 302 to ``redirect_to``
* ``"down"``     - the listening socket is closed: connections are refused.
                   ``up()`` (or switching to any other mode) binds the SAME port again.

Every answer closes its connection (HTTP/1.0), so a sender cannot keep reaching
a "down" receiver over an old keep-alive connection.

>>> with Receiver() as rx:
...     rx.url("/hook")             # http://127.0.0.1:PORT/hook
...     rx.mode = "error"
...     rx.wait_for(lambda: rx.requests, 5, "a request")
...     rx.verified("whsec_...")    # [(headers, parsed body), ...]; raises when one does not verify
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

LOOPBACK = "127.0.0.1"
MODES = ("ok", "error", "slow", "redirect", "down")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    arrived: float  # time.time() when the request (headers and body) was read
    mode: str  # what the receiver was doing then
    answered: int | None = None  # status code sent back (None: not answered, e.g. slow and cut off)

    @property
    def id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> str | None:
        return self.headers.get("x-streamguard-event")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        rx = self.server.receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mode = rx.mode
        req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                      time.time(), mode)
        rx._record(req)
        try:
            if mode == "slow":
                if rx._closing.wait(rx.slow_seconds):
                    return
                self._answer(req, 200, b'{"ok": true}')
            elif mode == "error":
                self._answer(req, 500, b'{"error": "receiver failure"}')
            elif mode == "redirect":
                self._answer(req, 302, b"", location=rx.redirect_to or "http://127.0.0.1:9/elsewhere")
            else:
                self._answer(req, 204, b"")
        except OSError:  # the sender gave up (timeout) and hung up
            pass

    def _answer(self, req: Request, status: int, body: bytes, location: str | None = None) -> None:
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)
        req.answered = status

    do_POST = do_PUT = do_GET = _handle


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    receiver: Receiver

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.receiver._lock:
            self.receiver.connections += 1
        return True


class Receiver:
    """See the module docstring. ``port`` stays the same across down()/up()."""

    def __init__(self, mode: str = "ok", *, slow_seconds: float = 2.5, redirect_to: str | None = None,
                 port: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self._mode = "down"
        self._wanted = mode
        self.slow_seconds = slow_seconds
        self.redirect_to = redirect_to
        self.port = port
        self.requests: list[Request] = []
        self.connections = 0  # TCP connections accepted (even ones that never sent a request)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> Receiver:
        self._closing.clear()
        if self._wanted == "down":
            self._bind()  # learn a port, then close it again
            self._unbind()
        else:
            self.up(self._wanted)
        return self

    def _bind(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                server = _Server((LOOPBACK, self.port), _Handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        server.receiver = self
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"receiver-{self.port}", daemon=True)
        self._thread.start()

    def _unbind(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def up(self, mode: str = "ok") -> Receiver:
        """Listen again on the same port (if down) and answer in `mode`."""
        if mode == "down":
            return self.down()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self._server is None:
            self._bind()
        self._mode = mode
        return self

    def down(self) -> Receiver:
        """Close the listening socket: connections to the port are refused."""
        self._mode = "down"
        self._unbind()
        return self

    def close(self) -> None:
        self._closing.set()
        self.down()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.up(mode)

    def url(self, path: str = "/hook") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    # --- what arrived ------------------------------------------------------------------

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def events(self) -> list[str | None]:
        return [r.event for r in self.snapshot()]

    def unique_by_id(self) -> list[Request]:
        """The first arrival of each webhook-id, in arrival order."""
        seen: set[str | None] = set()
        out = []
        for r in self.snapshot():
            if r.id not in seen:
                seen.add(r.id)
                out.append(r)
        return out

    def verified(self, secret: str, requests: list[Request] | None = None) -> list[tuple[dict[str, str], Any]]:
        """Every request (or `requests`) checked with a Standard Webhooks library
        against `secret`: [(headers, parsed body)]. Raises on the first failure,
        naming the request."""
        from standardwebhooks import Webhook

        hook = Webhook(secret)
        out = []
        for i, r in enumerate(self.snapshot() if requests is None else requests):
            try:
                out.append((r.headers, hook.verify(r.body, r.headers)))
            except Exception as exc:
                raise AssertionError(f"request #{i} ({r.event} {r.id}) does not verify with the secret: "
                                     f"{type(exc).__name__}: {exc}; signature={r.headers.get('webhook-signature')}"
                                     ) from exc
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                got = [(r.event, r.mode, r.answered) for r in self.snapshot()]
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"receiver on {self.port} got {len(got)} request(s): {got[-30:]}")
            time.sleep(interval)


def refused(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port."""
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) != 0
