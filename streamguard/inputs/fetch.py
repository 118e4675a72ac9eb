"""Fetching an input by URL (file jobs, standalone checks) under the input
address rules (CONTRACT §2).

Every hop (the URL, then each redirect, followed by hand, at most
MAX_REDIRECTS) is resolved once, judged by the address policy, and the HTTP
client is then handed exactly the addresses that were judged (`_PinnedResolver`):
DNS that answers differently a moment later (rebinding) changes nothing,
because the client never asks DNS itself. A refused hop is never connected to.

One time limit covers the whole fetch, retries and waits included. Connection
errors, stalls, a body cut short, 5xx, 408 and 429 are retried (`retries`
times, with doubling waits); a retry after a cut resumes with a Range request
(If-Range pins it to the same representation; a server that ignores Range
answers 200 and the fetch restarts from zero). Other 4xx are final. Files are
written to a temporary name next to `dest` and renamed when complete; a failed
fetch leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from ..addresses import AddressPolicy, parse_address
from ..config import SourcesSettings
from ..errors import AddressRefused, InputInvalid, InputUnreachable, PayloadTooLarge
from ..inference.pull import resumed_at
from ..media.probe import MAX_REDIRECTS, REDIRECTS
from .writer import ChunkWriter

USER_AGENT = "streamguard-fetch/1"
IMAGE_MAX_BYTES = 20 * 1000 * 1000  # the standalone image limit (CONTRACT §2: 20 MB)
RETRY_AFTER_MAX = 30.0  # a server's Retry-After is honoured up to this


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout: float  # seconds for the whole fetch, retries included
    retries: int = 3
    backoff: float = 1.0  # first wait before a retry; doubles each time
    stall_timeout: float = 30.0  # a connect or a read that makes no progress this long is retried


# --- sinks: where the bytes go ------------------------------------------------------------------

class _Sink(Protocol):
    size: int

    async def write(self, chunk: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def restart(self) -> None: ...


class _MemorySink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        self.data += chunk
        self.size += len(chunk)

    async def flush(self) -> None:
        pass

    async def restart(self) -> None:
        self.data.clear()
        self.size = 0


# --- addresses: resolve once per hop, judge, connect only there --------------------------------

class _PinnedResolver(AbstractResolver):
    """Answers the HTTP client with the addresses a hop was judged on, never
    with a fresh DNS answer; a host no hop was judged for cannot be reached."""

    def __init__(self) -> None:
        self.pinned: dict[str, list[dict[str, Any]]] = {}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        hosts = [dict(h, port=port) for h in self.pinned.get(host, [])
                 if family in (socket.AF_UNSPEC, h["family"])]
        if not hosts:
            raise OSError(errno.EACCES, f"{host} was not checked against the address rules")
        return hosts

    async def close(self) -> None:
        pass


@dataclass
class _Fetch:
    """One fetch: what it is for (`field` names it in errors) and what it learnt so far."""

    url: str
    field: str
    policy: AddressPolicy
    limits: FetchLimits
    resolver: _PinnedResolver
    validator: str | None = None  # ETag/Last-Modified of what is on disk, for If-Range
    total: int | None = None  # the representation's full size, once known

    def hop_name(self, hop: int) -> str:
        return self.field if hop == 0 else f"{self.field} (redirect {hop})"

    def unreachable(self, message: str, **details: Any) -> InputUnreachable:
        return InputUnreachable(message, details={"field": self.field, **details})


class _Retry(Exception):
    """A failure worth another attempt; `reason` is what the user is told if none is left."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def _pin_key(url: URL) -> str | None:
    """The host as the HTTP client will ask the resolver for it (IDNA-encoded)."""
    try:
        return url.raw_host
    except (ValueError, UnicodeError):
        return None


async def _admit(fetch: _Fetch, url: str, hop: int) -> None:
    """Resolve `url`'s host once, refuse it (422) unless every address is
    permitted, and pin what was judged for the connection."""
    name = fetch.hop_name(hop)
    try:
        parsed = URL(url)
        host = _pin_key(parsed)
    except (ValueError, UnicodeError):  # a host no encoding can carry
        parsed, host = None, None
    if parsed is None or parsed.scheme not in ("http", "https") or not host:
        if hop == 0:
            raise InputInvalid(f"{fetch.field} must be an http:// or https:// URL", details={"field": fetch.field})
        raise fetch.unreachable(f"{name} is not an http(s) URL", hop=hop)
    shown = parsed.host or host  # as the user wrote it (an IDN in Unicode)
    literal = parse_address(host)
    if literal is not None:
        addresses = [str(literal)]  # the HTTP client connects to a literal without asking the resolver
    else:
        try:
            infos = await ThreadedResolver().resolve(host, 0, socket.AF_UNSPEC)
        except (OSError, UnicodeError) as exc:
            if isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN:
                raise _Retry(f"{name} host {shown} cannot be resolved (temporary DNS failure)") from None
            raise fetch.unreachable(f"{name} host {shown} cannot be resolved", host=shown, hop=hop) from None
        fetch.resolver.pinned[host] = infos
        addresses = [info["host"] for info in infos]
    refused = fetch.policy.first_refused(addresses)
    if refused is not None:
        raise AddressRefused(fetch.policy.refusal(name, shown, refused), details={
            "field": fetch.field, "hop": hop, "host": shown, "address": str(refused),
            "setting": f"{fetch.policy.section}.allow_private"})


# --- one attempt ----------------------------------------------------------------------------------

def _validator(resp: aiohttp.ClientResponse) -> str | None:
    """What If-Range can pin a resumed request to: a strong ETag, else Last-Modified."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _too_large(fetch: _Fetch, size: int | None = None) -> PayloadTooLarge:
    shown = f" ({size} bytes)" if size is not None else ""
    return PayloadTooLarge(f"the input at {fetch.field} is larger{shown} than the limit of "
                           f"{fetch.limits.max_bytes} bytes",
                           details={"field": fetch.field, "limit": fetch.limits.max_bytes})


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return min(float(value), RETRY_AFTER_MAX) if value.isdigit() else None


async def _receive(fetch: _Fetch, resp: aiohttp.ClientResponse, sink: _Sink) -> None:
    status = resp.status
    offset = sink.size
    if status == 416 and offset:
        if fetch.total == offset:
            return  # everything had arrived before the connection broke
        await sink.restart()  # what we hold is not a prefix of what is there now
        raise _Retry("the server refused to resume the download")
    if status in (408, 429) or status >= 500:
        raise _Retry(f"HTTP {status} {resp.reason or ''}".strip(), _retry_after(resp))
    if not 200 <= status < 300:
        raise fetch.unreachable(f"HTTP {status} fetching {fetch.field}", status=status)
    resumed, total = resumed_at(resp, offset)
    if status == 206 and not resumed:  # a range other than the one asked for: start over, without Range
        await sink.restart()
        raise _Retry("the server sent the wrong byte range")
    if not resumed:  # a fresh body (the server ignored Range, or the file changed): from zero
        if offset:
            await sink.restart()
        fetch.validator = _validator(resp)
    fetch.total = total or None
    length = resp.content_length
    if total and total > fetch.limits.max_bytes:
        raise _too_large(fetch, total)
    if length is not None and sink.size + length > fetch.limits.max_bytes:
        raise _too_large(fetch, sink.size + length)
    try:
        async for chunk in resp.content.iter_any():
            if sink.size + len(chunk) > fetch.limits.max_bytes:
                raise _too_large(fetch)
            await sink.write(chunk)
    except aiohttp.ClientPayloadError:
        raise _Retry("the connection was cut before the whole input arrived") from None
    if fetch.total is not None and sink.size < fetch.total:
        raise _Retry("the connection was cut before the whole input arrived")


async def _attempt(fetch: _Fetch, session: aiohttp.ClientSession, sink: _Sink) -> None:
    url = fetch.url
    for hop in range(MAX_REDIRECTS + 1):
        await _admit(fetch, url, hop)
        headers = {"Accept-Encoding": "identity"}  # sizes and ranges are of the bytes stored
        if sink.size:
            headers["Range"] = f"bytes={sink.size}-"
            if fetch.validator:
                headers["If-Range"] = fetch.validator
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            location = resp.headers.get("Location")
            if resp.status in REDIRECTS and location:
                try:
                    url = str(URL(url).join(URL(location)))
                except (ValueError, UnicodeError):
                    raise fetch.unreachable(f"{fetch.hop_name(hop)} redirects to an invalid URL", hop=hop) from None
                continue
            await _receive(fetch, resp, sink)
            return
    raise fetch.unreachable(f"{fetch.field} redirected more than {MAX_REDIRECTS} times")


def _connection_reason(exc: BaseException) -> str:
    """What went wrong with a connection, in words a user knows ("connection refused")."""
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return "no response in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, OSError):
        if os_error.errno is not None and os_error.errno in errno.errorcode:
            return os.strerror(os_error.errno).lower()
        if os_error.strerror:
            return os_error.strerror
    return str(exc) or type(exc).__name__


def _final_error(fetch: _Fetch, exc: aiohttp.ClientError) -> InputUnreachable | None:
    """A client error no retry can fix (a bad certificate, a malformed reply), else None."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return fetch.unreachable(f"the TLS certificate of the {fetch.field} host is not valid: "
                                 f"{exc.certificate_error}")
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return fetch.unreachable(f"TLS handshake with the {fetch.field} host failed")
    if isinstance(exc, aiohttp.ClientResponseError):
        return fetch.unreachable(f"the {fetch.field} server sent an invalid HTTP reply")
    if isinstance(exc, aiohttp.InvalidURL):
        return fetch.unreachable(f"{fetch.field} is not a valid URL")
    return None


async def _with_retries(fetch: _Fetch, session: aiohttp.ClientSession, sink: _Sink) -> None:
    failures = 0
    while True:
        try:
            await _attempt(fetch, session, sink)
            await sink.flush()
            return
        except _Retry as exc:
            reason, wait = exc.reason, exc.wait
        except aiohttp.ClientError as exc:
            final = _final_error(fetch, exc)
            if final is not None:
                raise final from None
            reason, wait = _connection_reason(exc), None
        except (TimeoutError, OSError) as exc:  # a stall (sock_read/sock_connect) or a socket error
            reason, wait = _connection_reason(exc), None
        await sink.flush()  # what arrived is kept: the next attempt resumes after it
        failures += 1
        if failures > fetch.limits.retries:
            raise fetch.unreachable(f"{fetch.field} unreachable after {fetch.limits.retries} retries: {reason}")
        await asyncio.sleep(wait if wait is not None else fetch.limits.backoff * 2 ** (failures - 1))


async def _fetch_into(url: str, sink: _Sink, sources: SourcesSettings, limits: FetchLimits, field: str) -> None:
    resolver = _PinnedResolver()
    fetch = _Fetch(url, field, AddressPolicy.for_sources(sources), limits, resolver)
    stall = min(limits.stall_timeout, limits.timeout)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=1)
    async with aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False,
                                     headers={"User-Agent": USER_AGENT},
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=stall,
                                                                   sock_read=stall)) as session:
        try:
            async with asyncio.timeout(limits.timeout):
                await _with_retries(fetch, session, sink)
        except TimeoutError:
            raise fetch.unreachable(f"{field} took longer than {limits.timeout:g} s") from None


def _check_scheme(url: str, field: str) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and bool(URL(url).raw_host)
    except (ValueError, UnicodeError):
        ok = False
    if not ok:
        raise InputInvalid(f"{field} must be an http:// or https:// URL", details={"field": field})


async def download(url: str, dest: Path, *, sources: SourcesSettings, limits: FetchLimits,
                   field: str = "inputUrl") -> int:
    """Download `url` to `dest` (bytes written). Raises AddressRefused (422)
    for a refused address on any hop, InputUnreachable (502) when it cannot
    be fetched, PayloadTooLarge (413) past `limits.max_bytes`, InputInvalid
    (400) for a URL that is not http(s). `field` names the input in errors."""
    _check_scheme(url, field)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "w+b") as fh:
            sink = ChunkWriter(fh)
            await _fetch_into(url, sink, sources, limits, field)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sink.size


async def fetch_bytes(url: str, *, sources: SourcesSettings, limits: FetchLimits,
                      field: str = "inputUrl") -> bytes:
    """A small input (an image) fetched into memory, under the same rules as `download`."""
    _check_scheme(url, field)
    sink = _MemorySink()
    await _fetch_into(url, sink, sources, limits, field)
    return bytes(sink.data)
