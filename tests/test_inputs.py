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
    await download(files.url(f"/to?url={quote(target)}"), dest, sources=SourcesSettings(allow_private=True), limits=FAST)
    assert dest.read_bytes() == DATA


async def test_names_are_resolved_once_and_connected_to_as_judged(files: FileServer, tmp_path: Path,
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
    url = f"http://rebind.test:{files.port}/files/data.bin"
    assert await download(url, dest, sources=ALLOWED, limits=FAST) == len(DATA)
    assert asked == ["rebind.test"]


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
