"""Is an http(s) URL a live source? A look at it before a live task starts and
before each reconnect (CONTRACT §2: a recording is a file job, never a live
task, and a source that ended is never replayed from its start).

A plain file (finite body: Content-Length, byte ranges, or a file container's
first bytes) and an HLS playlist that carries `#EXT-X-ENDLIST` (for a master
playlist: its first variant) are recordings. What cannot be judged (an error
status, a timeout, a refused connection, a playlist larger than the read cap)
is left to the task: it starts and ends with 15 if no video comes, as any
unreachable live source does, so a refusal never tells a tenant more than
"this is a recording".

Reads are small (a few KiB, a whole playlist up to PLAYLIST_BYTES), redirects
are followed by hand (each hop can be checked before it is connected to), and
the whole look is bounded by one timeout.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
from yarl import URL

from ..errors import NotLiveSource, StreamGuardError

log = logging.getLogger(__name__)

USER_AGENT = "streamguard-probe/1"
MAX_REDIRECTS = 5
HEAD_BYTES = 4096  # enough for the first bytes and the Content-Type to tell
PLAYLIST_BYTES = 2 << 20  # a VOD playlist's ENDLIST is at its end: read it whole up to this
REDIRECTS = (301, 302, 303, 307, 308)
PLAYLIST_TYPES = frozenset({"application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl",
                            "audio/x-mpegurl"})
NOT_VIDEO_TYPES = frozenset({"application/json", "application/xml", "application/xhtml+xml",
                             "application/javascript"})
# Containers that only ever hold recordings (unlike FLV, MPEG-TS or WebM,
# which are also served live over plain HTTP).
FILE_SIGNATURES = ((4, b"ftyp"), (0, b"RIFF"))
JOBS_HINT = "submit recorded video as a file job: POST /v1/jobs"

# Called with every URL before it is connected to (the first and each
# redirect target); raises to refuse it (address rules).
HopCheck = Callable[[str], Awaitable[None]]


class Verdict(enum.Enum):
    LIVE = "live"
    UNKNOWN = "unknown"  # could not tell: treated as live
    FILE = "file"
    ENDED = "ended"  # an HLS playlist with #EXT-X-ENDLIST
    NOT_VIDEO = "not_video"  # text, HTML, JSON...

    @property
    def refused(self) -> bool:
        return self in (Verdict.FILE, Verdict.ENDED, Verdict.NOT_VIDEO)


@dataclass(frozen=True)
class Probe:
    verdict: Verdict
    what: str  # what the URL turned out to be, for messages and logs


@dataclass(frozen=True)
class _Response:
    url: str  # after redirects
    status: int
    content_type: str
    length: int | None
    ranged: bool  # byte ranges offered or served
    body: bytes  # the first bytes; a playlist's whole text when `complete`
    playlist: bool
    complete: bool


def is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


async def _read(stream: aiohttp.StreamReader, limit: int) -> bytes:
    buf = bytearray()
    while len(buf) < limit:
        chunk = await stream.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _looks_like_playlist(content_type: str, head: bytes) -> bool:
    return content_type in PLAYLIST_TYPES or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"#EXTM3U")


async def _get(session: aiohttp.ClientSession, url: str, check_hop: HopCheck | None) -> _Response | None:
    """GET with redirects followed by hand; None after too many of them."""
    for _ in range(MAX_REDIRECTS + 1):
        if check_hop is not None:
            await check_hop(url)
        async with session.get(url, allow_redirects=False) as resp:
            location = resp.headers.get("Location")
            if resp.status in REDIRECTS and location:
                url = str(URL(url).join(URL(location)))
                continue
            content_type = resp.content_type.lower()
            head = await _read(resp.content, HEAD_BYTES)
            playlist = _looks_like_playlist(content_type, head)
            body, complete = head, len(head) < HEAD_BYTES
            if playlist and not complete:
                body += await _read(resp.content, PLAYLIST_BYTES - len(head))
                complete = not await resp.content.read(1)
            ranged = resp.status == 206 or resp.headers.get("Accept-Ranges", "").lower() == "bytes"
            return _Response(url, resp.status, content_type, resp.content_length, ranged, body, playlist, complete)
    return None


def _playlist_lines(body: bytes) -> list[str]:
    return [line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()]


def _first_variant(lines: list[str]) -> str | None:
    """The URI after the first #EXT-X-STREAM-INF of a master playlist."""
    for i, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF"):
            return next((uri for uri in lines[i + 1:] if not uri.startswith("#")), None)
    return None


def _media_playlist(resp: _Response) -> Probe:
    lines = _playlist_lines(resp.body)
    if "#EXT-X-ENDLIST" in lines:
        return Probe(Verdict.ENDED, "a finished HLS playlist (it has #EXT-X-ENDLIST)")
    if any(line.replace(" ", "").upper() == "#EXT-X-PLAYLIST-TYPE:VOD" for line in lines):
        return Probe(Verdict.ENDED, "an HLS VOD playlist (#EXT-X-PLAYLIST-TYPE:VOD)")
    if not resp.complete:
        return Probe(Verdict.UNKNOWN, f"an HLS playlist larger than {PLAYLIST_BYTES} bytes")
    return Probe(Verdict.LIVE, "a live HLS playlist")


def _not_playlist(resp: _Response) -> Probe:
    ctype = resp.content_type or "no Content-Type"
    if resp.content_type.startswith("text/") or resp.content_type in NOT_VIDEO_TYPES:
        return Probe(Verdict.NOT_VIDEO, f"a {ctype} document")
    signature = any(resp.body[at:at + len(magic)] == magic for at, magic in FILE_SIGNATURES)
    if resp.length is not None or resp.ranged or signature:
        size = f", {resp.length} bytes" if resp.length is not None else ""
        return Probe(Verdict.FILE, f"a file ({ctype}{size})")
    return Probe(Verdict.LIVE, f"an unbounded HTTP stream ({ctype})")


async def _probe(session: aiohttp.ClientSession, url: str, check_hop: HopCheck | None) -> Probe:
    resp = await _get(session, url, check_hop)
    if resp is None:
        return Probe(Verdict.UNKNOWN, f"more than {MAX_REDIRECTS} redirects")
    if not 200 <= resp.status < 300:
        return Probe(Verdict.UNKNOWN, f"HTTP {resp.status}")
    if not resp.playlist:
        return _not_playlist(resp)
    variant = _first_variant(_playlist_lines(resp.body))
    if variant is None:
        return _media_playlist(resp)
    inner = await _get(session, str(URL(resp.url).join(URL(variant))), check_hop)
    if inner is None or not 200 <= inner.status < 300 or not inner.playlist:
        return Probe(Verdict.UNKNOWN, "a master playlist whose first variant cannot be read")
    found = _media_playlist(inner)
    if found.verdict is Verdict.ENDED:
        return Probe(Verdict.ENDED, f"a master playlist whose first variant is {found.what}")
    return found


async def probe_http_source(url: str, timeout: float, *, check_hop: HopCheck | None = None) -> Probe:
    """What an http(s) URL serves. Network failures are UNKNOWN, never raised;
    a `check_hop` refusal (StreamGuardError) is raised."""
    session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, trust_env=False,
                                    timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        async with asyncio.timeout(timeout):
            return await _probe(session, url, check_hop)
    except StreamGuardError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return Probe(Verdict.UNKNOWN, f"not reachable ({type(exc).__name__})")
    finally:
        await session.close()


async def check_live_source(url: str, timeout: float, *, check_hop: HopCheck | None = None) -> None:
    """At start: refuse (422) an http(s) URL that is a recording or not video.
    Other schemes are not connected to here."""
    if not is_http(url):
        return
    probe = await probe_http_source(url, timeout, check_hop=check_hop)
    log.debug("probe of a stream url: %s", probe.what)
    if not probe.verdict.refused:
        return
    details = {"field": "url", "reason": probe.verdict.value}
    if probe.verdict is Verdict.NOT_VIDEO:
        raise NotLiveSource(f"url serves {probe.what}, not a live video stream "
                            f"(rtmp://, rtsp:// or an HLS playlist)", details=details)
    raise NotLiveSource(f"url is {probe.what}, not a live stream; {JOBS_HINT}", details=details)


def finished_playlist(url: str, timeout: float, *, check_hop: HopCheck | None = None) -> str | None:
    """Blocking, for a task's ingest thread before it (re)opens an http(s)
    source: why reopening would replay it from its start (its playlist
    ended), or None."""
    if not is_http(url):
        return None
    try:
        probe = asyncio.run(probe_http_source(url, timeout, check_hop=check_hop))
    except StreamGuardError:
        raise  # a refused hop: the caller's address rules decide
    except Exception as exc:  # the check must never be what ends a task
        log.debug("probe failed: %r", exc)
        return None
    return f"the stream ended: its source is {probe.what}" if probe.verdict is Verdict.ENDED else None
