"""`streamguard models pull` against a real HTTP server on loopback.

The server lays the test bundle out like the Hugging Face hub
(visual/model.onnx, textual/model.onnx, textual/tokenizer.json), honours
Range requests, and can mimic the hub's LFS redirect with X-Linked-Etag, ignore
Range, or serve corrupted bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streamguard.config import ModelSettings
from streamguard.errors import DownloadError
from streamguard.inference.bundle import MANIFEST_NAME, read_manifest
from streamguard.inference.pull import (
    HUB_URL_ENV,
    describe_bundle,
    list_sources,
    load_source,
    pull_bundle,
)

HUB_LAYOUT = {"visual.onnx": "visual/model.onnx", "textual.onnx": "textual/model.onnx",
              "tokenizer.json": "textual/tokenizer.json"}


@dataclass
class Hub:
    files: dict[str, bytes]  # hub path -> content
    honor_range: bool = True
    # Mimic the hub's LFS answer: 302 carrying X-Linked-Etag, then the CDN.
    lfs_redirect: bool = False
    corrupt: set[str] = field(default_factory=set)
    # Announce the full length but hang up halfway through the body.
    cut: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # path, Range, status
    base_url: str = ""

    def body_requests(self, path: str) -> list[tuple[str, str | None, int]]:
        return [r for r in self.requests if r[0] == path and r[2] in (200, 206)]


def _handler(hub: Hub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            hub.requests.append((self.path, self.headers.get("Range"), status))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path.removeprefix("/cdn/").removeprefix("/hub/") in hub.cut:
                self.wfile.write(body[:len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self) -> None:
            cdn = self.path.startswith("/cdn/")
            path = self.path.removeprefix("/cdn/").removeprefix("/hub/")
            if path not in hub.files:
                return self._send(404, b"not found")
            data = hub.files[path]
            sha = hashlib.sha256(data).hexdigest()
            if hub.lfs_redirect and not cdn:
                return self._send(302, headers={"Location": f"/cdn/{path}", "X-Linked-Etag": f'"{sha}"',
                                                "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'})
            if path in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if hub.honor_range and match:
                start = int(match.group(1))
                if start >= len(data):
                    return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                return self._send(206, data[start:], {
                    "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            # A CDN's ETag is no sha256 of the content (an md5 here).
            return self._send(200, data, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    return Handler


@pytest.fixture(scope="module")
def bundle(test_bundle: Path) -> Path:
    return test_bundle  # served read-only


@pytest.fixture
def hub(bundle: Path) -> Iterator[Hub]:
    state = Hub(files={url: (bundle / name).read_bytes() for name, url in HUB_LAYOUT.items()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    # A short poll keeps shutdown() (which waits for the next poll) from costing 0.5 s a test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/hub/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HUB_URL_ENV, raising=False)


def _source(bundle: Path, tmp_path: Path, *, checksums: bool = False, urls: dict[str, str] | None = None) -> Path:
    """A source JSON for the test bundle; base_url is unroutable so tests must override it."""
    manifest = msgspec.to_builtins(read_manifest(bundle))
    files = manifest.pop("files")
    source = {
        "name": "streamguard-test",
        "base_url": "http://hub.invalid/streamguard-test/resolve/main/",
        "manifest": manifest,
        "files": {name: {"url": (urls or HUB_LAYOUT)[name],
                         "sha256": files[name]["sha256"] if checksums else ""}
                  for name in HUB_LAYOUT},
    }
    path = tmp_path / "source.json"
    path.write_text(json.dumps(source))
    return path


def _assert_same_files(bundle: Path, dest: Path) -> None:
    for name in HUB_LAYOUT:
        assert (dest / name).read_bytes() == (bundle / name).read_bytes()
    assert not list(dest.glob("*.part"))


def test_full_pull_loads_and_encodes(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    from streamguard.inference.clip import ClipModel

    dest = pull_bundle(str(_source(bundle, tmp_path)), tmp_path / "out", base_url=hub.base_url, progress=False)
    _assert_same_files(bundle, dest)
    manifest = read_manifest(dest)
    assert set(manifest.files) == set(HUB_LAYOUT)
    for name, entry in manifest.files.items():
        assert entry.sha256 == hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        assert entry.size == (bundle / name).stat().st_size
        assert entry.url == HUB_LAYOUT[name]

    model = ClipModel(dest, ModelSettings(), tmp_path / "cache")
    red = np.zeros((1, 224, 224, 3), np.uint8)
    red[..., 0] = 255
    images = model.encode_images(red)
    texts, tokens = model.encode_texts(["a photo of a cat"])
    assert images.shape == (1, manifest.embedding_dim) and texts.shape == (1, manifest.embedding_dim)
    assert np.isclose(np.linalg.norm(images), 1.0) and tokens > 0

    info = describe_bundle(dest, verify=True)
    assert info["name"] == "streamguard-test" and info["complete"]
    assert all(f["ok"] for f in info["files"])


def test_resume_uses_range(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    full = (bundle / "visual.onnx").read_bytes()
    half = len(full) // 2
    (dest / "visual.onnx.part").write_bytes(full[:half])

    pull_bundle(str(_source(bundle, tmp_path)), dest, base_url=hub.base_url, progress=False)

    assert hub.body_requests("/hub/visual/model.onnx") == [("/hub/visual/model.onnx", f"bytes={half}-", 206)]
    _assert_same_files(bundle, dest)
    assert (dest / MANIFEST_NAME).is_file()


def test_interrupted_download_keeps_part_and_resumes(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    hub.cut.add("visual/model.onnx")
    source, dest = str(_source(bundle, tmp_path)), tmp_path / "out"
    with pytest.raises(DownloadError, match="interrupted at .* run the pull again to resume"):
        pull_bundle(source, dest, base_url=hub.base_url, progress=False)
    half = (dest / "visual.onnx.part").stat().st_size
    assert half > 0 and not (dest / MANIFEST_NAME).exists()

    hub.cut.clear()
    pull_bundle(source, dest, base_url=hub.base_url, progress=False)

    assert hub.body_requests("/hub/visual/model.onnx")[-1] == ("/hub/visual/model.onnx", f"bytes={half}-", 206)
    _assert_same_files(bundle, dest)


def test_part_as_long_as_file_restarts(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    size = (bundle / "tokenizer.json").stat().st_size
    (dest / "tokenizer.json.part").write_bytes(b"y" * size)  # server answers 416 to its Range

    pull_bundle(str(_source(bundle, tmp_path)), dest, base_url=hub.base_url, progress=False)

    assert [r[1:] for r in hub.requests if r[0] == "/hub/textual/tokenizer.json"] == \
        [(f"bytes={size}-", 416), (None, 200)]
    _assert_same_files(bundle, dest)


def test_server_ignoring_range_restarts_from_zero(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    hub.honor_range = False
    dest = tmp_path / "out"
    dest.mkdir()
    # Junk that is no prefix of the file: appending to it would fail the checksum.
    (dest / "visual.onnx.part").write_bytes(b"x" * 100)

    pull_bundle(str(_source(bundle, tmp_path, checksums=True)), dest, base_url=hub.base_url, progress=False)

    assert hub.body_requests("/hub/visual/model.onnx") == [("/hub/visual/model.onnx", "bytes=100-", 200)]
    _assert_same_files(bundle, dest)


@pytest.mark.parametrize("how", ["source-sha256", "x-linked-etag"])
def test_checksum_mismatch(bundle: Path, hub: Hub, tmp_path: Path, how: str) -> None:
    hub.corrupt.add("visual/model.onnx")
    hub.lfs_redirect = how == "x-linked-etag"
    dest = tmp_path / "out"
    source = _source(bundle, tmp_path, checksums=how == "source-sha256")

    with pytest.raises(DownloadError, match=r"checksum mismatch for visual\.onnx") as err:
        pull_bundle(str(source), dest, base_url=hub.base_url, progress=False)

    assert "\n" not in err.value.message
    assert not (dest / MANIFEST_NAME).exists()
    assert not (dest / "visual.onnx").exists()
    assert not (dest / "visual.onnx.part").exists()


def test_lfs_redirect_and_linked_etag(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    hub.lfs_redirect = True
    dest = pull_bundle(str(_source(bundle, tmp_path)), tmp_path / "out", base_url=hub.base_url, progress=False)
    _assert_same_files(bundle, dest)
    assert [r[0] for r in hub.requests if r[2] == 200] == [f"/cdn/{u}" for u in HUB_LAYOUT.values()]


def test_unreachable_host(bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        pull_bundle(str(_source(bundle, tmp_path)), tmp_path / "out",
                    base_url=f"http://127.0.0.1:{port}/", progress=False, timeout=2)
    message = err.value.message
    assert f"cannot reach 127.0.0.1:{port}" in message and "refused" in message.lower()
    assert "--model DIR" in message and "\n" not in message
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_http_404(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    urls = {**HUB_LAYOUT, "tokenizer.json": "textual/missing.json"}
    with pytest.raises(DownloadError, match=r"textual/missing\.json failed: HTTP 404"):
        pull_bundle(str(_source(bundle, tmp_path, urls=urls)), tmp_path / "out",
                    base_url=hub.base_url, progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_repull_is_a_noop(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    source = str(_source(bundle, tmp_path))
    dest = pull_bundle(source, tmp_path / "out", base_url=hub.base_url, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    hub.requests.clear()

    pull_bundle(source, dest, base_url=hub.base_url, progress=False)

    assert hub.requests == []
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps


def test_repull_without_manifest_trusts_announced_sha(bundle: Path, hub: Hub, tmp_path: Path) -> None:
    hub.lfs_redirect = True
    source = str(_source(bundle, tmp_path))
    dest = pull_bundle(source, tmp_path / "out", base_url=hub.base_url, progress=False)
    (dest / MANIFEST_NAME).unlink()  # as if the first pull died just before the end
    stamps = {name: (dest / name).stat().st_mtime_ns for name in HUB_LAYOUT}

    pull_bundle(source, dest, base_url=hub.base_url, progress=False)

    # The pull asks the hub (nothing else knows the checksums) but drops each
    # answer after the headers instead of rewriting a file it already has.
    assert {name: (dest / name).stat().st_mtime_ns for name in HUB_LAYOUT} == stamps
    assert read_manifest(dest).files["visual.onnx"].sha256 == \
        hashlib.sha256((bundle / "visual.onnx").read_bytes()).hexdigest()


def test_env_overrides_base_url(bundle: Path, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HUB_URL_ENV, hub.base_url.rstrip("/"))  # trailing slash is optional
    dest = pull_bundle(str(_source(bundle, tmp_path)), tmp_path / "out", progress=False)
    _assert_same_files(bundle, dest)


def test_builtin_clip_source() -> None:
    assert "clip-vit-b32" in list_sources()
    src = load_source("clip-vit-b32")
    # Pinned to one hub commit: `main` has been re-exported since, so only a
    # revision makes the published LFS sha256/size below stay true.
    assert src.base_url == ("https://huggingface.co/immich-app/ViT-B-32__openai/resolve/"
                            "77520f2136c0467e32b012be8d190ccf110c5667/")
    for name in ("visual.onnx", "textual.onnx"):
        assert len(src.files[name].sha256) == 64 and src.files[name].size > 200_000_000
    assert set(src.files) == {"visual.onnx", "textual.onnx", "tokenizer.json"}
    assert src.files["textual.onnx"].url == "textual/model.onnx"
    m = src.manifest
    assert (m.image_size, m.embedding_dim, m.tokens_per_image, m.logit_scale) == (224, 512, 50, 100.0)
    assert (m.tokenizer.context_length, m.tokenizer.pad_id, m.text.input_dtype) == (77, 0, "int32")
    assert m.visual.input == m.text.input == ""
