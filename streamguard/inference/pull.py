"""`streamguard models pull`: fetch a model bundle described by a pull source.

A pull source is a JSON file (see `PullSource`): a base URL, the bundle
manifest minus `files`, and for each bundle file the URL it comes from. The
built-in sources ship inside the package (`streamguard/inference/sources/`),
so an installed wheel can pull too; a repository checkout may add more under
`models/sources/`, and any source JSON can be passed by path.

Downloads use only the standard library. Each file streams into
`<dest>/<file>.part` and resumes with an HTTP Range request when that exists;
it is verified against a sha256 (the source's, else the one the Hugging Face
hub announces for LFS files, else computed and recorded), renamed into place,
and `manifest.json` is written last, so a half-pulled bundle never looks like
a bundle. Every failure surfaces as a one-line `DownloadError` / `ModelError`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Annotated, Any, Protocol, TextIO

import msgspec
from msgspec import Meta

from ..errors import DownloadError, ModelError
from .bundle import MANIFEST_NAME, FileEntry, Manifest, read_manifest, sha256_file

log = logging.getLogger(__name__)

HUB_URL_ENV = "STREAMGUARD_MODEL_HUB_URL"
BUILTIN_SOURCES_DIR = Path(__file__).resolve().parent / "sources"
# Only exists in a repository checkout; lets people add sources without packaging them.
CHECKOUT_SOURCES_DIR = Path(__file__).resolve().parents[2] / "models" / "sources"
PART_SUFFIX = ".part"
CHUNK = 1 << 20
USER_AGENT = "streamguard-models-pull/1"

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Bundle file names are written under dest: no separators, no dot-dot tricks.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class SourceFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Relative to the source's base_url, or absolute.
    url: str
    # Empty = trust the hub's announced sha256, or compute one.
    sha256: str = ""
    # 0 = unknown.
    size: Annotated[int, Meta(ge=0)] = 0


class PullSource(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    base_url: str = ""
    # The bundle manifest to write; its `files` are filled in by the pull.
    manifest: Manifest
    # Bundle file name -> where it comes from.
    files: dict[str, SourceFile]


# --------------------------------------------------------------- sources


def _source_dirs() -> list[Path]:
    return [d for d in (BUILTIN_SOURCES_DIR, CHECKOUT_SOURCES_DIR) if d.is_dir()]


def list_sources() -> list[str]:
    """Names accepted by `pull_bundle` without a path (built-in first wins)."""
    return sorted({p.stem for d in _source_dirs() for p in d.glob("*.json")})


def _source_path(source: str | Path) -> Path:
    text = str(source)
    if isinstance(source, Path) or text.endswith(".json") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelError(f"model source file {path} not found")
        return path
    for directory in _source_dirs():
        candidate = directory / f"{text}.json"
        if candidate.is_file():
            return candidate
    known = ", ".join(list_sources()) or "none"
    raise ModelError(f"unknown model source {text!r} (known: {known}); "
                     f"or pass the path of a source JSON file")


def _check_source(src: PullSource, path: Path) -> None:
    for name, entry in src.files.items():
        if not _SAFE_NAME.fullmatch(name) or name == MANIFEST_NAME:
            raise ModelError(f"invalid model source {path}: bad bundle file name {name!r}")
        entry.sha256 = entry.sha256.strip().lower()
        if entry.sha256 and not _SHA256.fullmatch(entry.sha256):
            raise ModelError(f"invalid model source {path}: sha256 of {name} is not 64 hex digits")
    m = src.manifest
    for needed in (m.visual.file, m.text.file, m.tokenizer.file):
        if needed not in src.files:
            raise ModelError(f"invalid model source {path}: manifest needs {needed!r} "
                             f"but `files` does not say where to get it")


def load_source(source: str | Path) -> PullSource:
    """A built-in source by name, or a source JSON file by path."""
    path = _source_path(source)
    try:
        src = msgspec.json.decode(path.read_bytes(), type=PullSource)
    except OSError as exc:
        raise ModelError(f"cannot read model source {path}: {exc.strerror or exc}") from None
    except msgspec.DecodeError as exc:  # includes ValidationError
        raise ModelError(f"invalid model source {path}: {exc}") from None
    _check_source(src, path)
    return src


def _base_url(src: PullSource, override: str | None) -> str:
    base = override or os.environ.get(HUB_URL_ENV) or src.base_url
    # urljoin drops the last path segment of a base without a trailing slash.
    return base if not base or base.endswith("/") else base + "/"


def _file_url(base: str, url: str) -> str:
    full = urllib.parse.urljoin(base, url) if base else url
    if urllib.parse.urlsplit(full).scheme not in ("http", "https"):
        raise ModelError(f"model source url {full!r} is not an http(s) URL")
    return full


# ------------------------------------------------------------------ HTTP


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps each redirect's headers: the hub puts an LFS file's sha256 on its
    302 (X-Linked-Etag), and the CDN it redirects to does not repeat it."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _cause(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _unreachable(url: str, reason: object) -> DownloadError:
    host = urllib.parse.urlsplit(url).netloc or url
    return DownloadError(
        f"cannot reach {host} ({url}): {_cause(reason)} — pull needs access to the model hub: "
        f"use a mirror (--base-url URL or {HUB_URL_ENV}), copy a bundle directory and pass --model DIR, "
        f"or build the test model with `streamguard models make-test DIR` (pipeline checks only)",
        details={"url": url})


def _http_failure(url: str, code: int, reason: str) -> DownloadError:
    if code == 404:
        hint = " — check the source's url (and any base URL override)"
    elif code in (401, 403):
        hint = " — access denied; the repository may be gated or private"
    elif code == 429 or code >= 500:
        hint = " — the server is overloaded or failing; try again later"
    else:
        hint = ""
    return DownloadError(f"download of {url} failed: HTTP {code} {reason}{hint}",
                         details={"url": url, "status": code})


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse, list[Message]] | None:
    """GET url from byte `offset`; None when the server says that range is
    not satisfiable (the .part is as long as the file, or longer)."""
    redirects = _RecordingRedirects()
    opener = urllib.request.build_opener(redirects)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise _http_failure(url, exc.code, str(exc.reason)) from None
    except urllib.error.URLError as exc:
        raise _unreachable(url, exc.reason) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, exc) from None
    return resp, redirects.hops


def _hex_etag(value: str | None) -> str:
    """The sha256 in an ETag-style header, or "" when it holds something else
    (a git blob sha1, an S3 md5, ...)."""
    if not value:
        return ""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"').lower()
    return value if _SHA256.fullmatch(value) else ""


def _announced_sha256(hops: list[Message], final: Message) -> str:
    for headers in [*hops, final]:
        if sha := _hex_etag(headers.get("X-Linked-Etag")):
            return sha
    # A plain ETag only counts on the URL we asked for: a CDN's ETag after a
    # redirect is its own business and may look like a sha256 without being one.
    return _hex_etag((hops[0] if hops else final).get("ETag"))


def _announced_size(hops: list[Message], final: Message) -> int:
    for headers in [*hops, final]:
        value = headers.get("X-Linked-Size", "")
        if value.isdigit():
            return int(value)
    return 0


class _Reply(Protocol):
    status: int
    headers: Any  # a mapping with .get(): http.client's and aiohttp's headers both fit


def resumed_at(resp: _Reply, offset: int) -> tuple[bool, int]:
    """(whether the body continues a partial file at `offset`, the file's total size or 0).
    Shared with streamguard.inputs.fetch."""
    if resp.status == 206:
        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == offset:
            total = match.group(3)
            return True, int(total) if total.isdigit() else 0
        return False, 0
    length = resp.headers.get("Content-Length", "")
    return False, int(length) if length.isdigit() else 0


# -------------------------------------------------------------- progress


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Progress:
    """One status line on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int, start: int, stream: TextIO | None) -> None:
        self.label, self.total, self.start, self.stream = label, total, start, stream
        self.began = self.last = time.monotonic()
        self.width = 0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.last < 0.1):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.began, 1e-6)
        size = f"{_human(done)}/{_human(self.total)} {100 * done / self.total:3.0f}%" if self.total \
            else _human(done)
        line = f"{self.label:<16} {size}  {_human(rate)}/s"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self, done: int) -> None:
        if self.stream is not None:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------- download


def _matches(path: Path, sha256: str, size: int) -> bool:
    if not sha256 or not path.is_file():
        return False
    if size and path.stat().st_size != size:
        return False
    return sha256_file(path) == sha256


def _hash_prefix(digest: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)


def _fetch(name: str, entry: SourceFile, url: str, dest: Path, *,
           known_sha256: str, timeout: float, stream: TextIO | None) -> FileEntry:
    final, part = dest / name, dest / (name + PART_SUFFIX)
    offset = part.stat().st_size if part.is_file() else 0
    if entry.size and offset >= entry.size:  # cannot be a strict prefix: start over
        part.unlink()
        offset = 0
    opened = _open(url, offset, timeout)
    if opened is None:
        part.unlink(missing_ok=True)
        offset = 0
        opened = _open(url, 0, timeout)
        if opened is None:  # only a broken server answers 416 to a plain GET
            raise DownloadError(f"download of {url} failed: HTTP 416 without a Range request")
    resp, hops = opened
    with resp:
        expected = known_sha256 or _announced_sha256(hops, resp.headers)
        expected_size = entry.size or _announced_size(hops, resp.headers)
        if _matches(final, expected, expected_size):  # already there (e.g. manifest was lost)
            part.unlink(missing_ok=True)
            return FileEntry(sha256=expected, size=final.stat().st_size, url=entry.url)
        resumed, total = resumed_at(resp, offset)
        if not resumed:  # server ignored Range (200) or sent another range: from zero
            offset = 0
        total = total or expected_size
        if entry.size and total and total != entry.size:
            raise DownloadError(f"download of {url} failed: server has {total} bytes, "
                                f"source says {entry.size}")
        digest = hashlib.sha256()
        if offset:
            _hash_prefix(digest, part)
            log.info("resuming %s at %d bytes", name, offset)
        bar = _Progress(name, total, offset, stream)
        done = offset
        with open(part, "ab" if offset else "wb") as fh:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    bar.close(done)
                    raise DownloadError(f"download of {url} interrupted after {done} bytes: "
                                        f"{_cause(exc)} — run the pull again to resume") from None
                if not block:
                    break
                fh.write(block)
                digest.update(block)
                done += len(block)
                bar.update(done)
            fh.flush()
            os.fsync(fh.fileno())
        bar.close(done)
    if total and done < total:  # connection closed early; the .part is a good prefix
        raise DownloadError(f"download of {url} interrupted at {done} of {total} bytes "
                            f"— run the pull again to resume")
    actual = digest.hexdigest()
    if (total and done > total) or (expected and actual != expected):
        part.unlink(missing_ok=True)
        what = f"size {done}, expected {total}" if total and done > total \
            else f"sha256 {actual}, expected {expected}"
        raise DownloadError(f"checksum mismatch for {name} from {url}: {what} — deleted the "
                            f"partial download; run the pull again (if it repeats, the source is stale)",
                            details={"url": url, "file": name})
    os.replace(part, final)
    return FileEntry(sha256=actual, size=done, url=entry.url)


def _previous_entries(dest: Path, src: PullSource) -> dict[str, FileEntry]:
    """Checksums recorded by an earlier pull of the same source into dest."""
    if not (dest / MANIFEST_NAME).is_file():
        return {}
    try:
        old = read_manifest(dest)
    except ModelError:
        return {}
    if old.name != src.manifest.name:
        return {}
    return {name: e for name, e in old.files.items()
            if name in src.files and e.url == src.files[name].url and _SHA256.fullmatch(e.sha256)}


def _write_manifest_atomic(dest: Path, manifest: Manifest) -> None:
    path = dest / MANIFEST_NAME
    data = msgspec.json.format(msgspec.json.encode(manifest))
    if path.is_file() and path.read_bytes() == data:
        return  # keep a re-pull a true no-op
    tmp = dest / (MANIFEST_NAME + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def pull_bundle(source: str, dest: Path, *, base_url: str | None = None,
                progress: bool | None = None, timeout: float = 30) -> Path:
    """Download the bundle `source` (a built-in name or a source JSON path)
    into `dest` and return `dest`. `base_url` (else $STREAMGUARD_MODEL_HUB_URL)
    replaces the source's base URL. Files already present with the right
    checksum are not downloaded again."""
    src = load_source(source)
    base = _base_url(src, base_url)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if (sys.stderr.isatty() if progress is None else progress) else None
    previous = _previous_entries(dest, src)
    entries: dict[str, FileEntry] = {}
    for name, entry in src.files.items():
        url = _file_url(base, entry.url)
        old = previous.get(name)
        known = entry.sha256 or (old.sha256 if old else "")
        size = entry.size or (old.size if old else 0)
        if _matches(dest / name, known, size):
            log.info("%s is up to date", name)
            entries[name] = FileEntry(sha256=known, size=(dest / name).stat().st_size, url=entry.url)
            continue
        # The bundle is about to change: until the new manifest lands it must not look complete.
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
        log.info("fetching %s from %s", name, url)
        entries[name] = _fetch(name, entry, url, dest, known_sha256=known, timeout=timeout, stream=stream)
    _write_manifest_atomic(dest, msgspec.structs.replace(src.manifest, files=entries))
    return dest


# ------------------------------------------------------------- inspect


def describe_bundle(bundle_dir: Path, *, verify: bool = False) -> dict[str, Any]:
    """What `streamguard models inspect` prints. `verify` re-hashes every file."""
    bundle_dir = Path(bundle_dir)
    m = read_manifest(bundle_dir)
    names = list(dict.fromkeys([m.visual.file, m.text.file, m.tokenizer.file, *m.files]))
    files = []
    for name in names:
        path = bundle_dir / name
        entry = m.files.get(name)
        present = path.is_file()
        info: dict[str, Any] = {
            "name": name,
            "present": present,
            "size": path.stat().st_size if present else None,
            "expected_size": entry.size if entry else None,
            "sha256": entry.sha256 if entry else "",
            "url": entry.url if entry else "",
        }
        if verify:
            info["ok"] = bool(present and entry and _matches(path, entry.sha256, entry.size))
        files.append(info)
    return {
        "path": str(bundle_dir),
        "name": m.name,
        "family": m.family,
        "description": m.description,
        "shape_real": m.shape_real,
        "format": m.format,
        "image_size": m.image_size,
        "embedding_dim": m.embedding_dim,
        "tokens_per_image": m.tokens_per_image,
        "logit_scale": m.logit_scale,
        "context_length": m.tokenizer.context_length,
        "text_input_dtype": m.text.input_dtype,
        "quantization": msgspec.to_builtins(m.quantization),
        "files": files,
        "total_size": sum(f["size"] or 0 for f in files),
        "complete": all(f["present"] and (not f["expected_size"] or f["size"] == f["expected_size"])
                        for f in files),
    }
