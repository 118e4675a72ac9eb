"""Where media goes once written (CONTRACT §5, §8): the storage interface and
its local implementation; the S3-compatible one is in media/s3.py.

Media is always written locally first (PyAV muxes to files): a task's or
job's folder under the data dir. A `MediaStorage` is where it is published
and served from, by key (`<task id>/source/segment_000.ts`, relative to the
storage's own root or prefix):

- `LocalStorage`: the media root itself, served under `/media` (a single node);
- `S3Storage` (media/s3.py): a bucket under a prefix, served from the bucket's
  URL or a CDN in front of it; several nodes can share one.

Every method blocks (file system or network): call them from worker threads,
never on the event loop. Two ways media reaches a storage:

- `upload_tree`: a finished tree at once (a file job), segments and images
  first, then the rendition playlists, the master playlist last, so nothing
  that is listed is missing;
- `MediaMirror`: a live task's files as they close, in order on one worker
  thread: a segment is uploaded before the playlist that lists it, so a
  player never meets a playlist entry that points at a missing object.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from ..config import S3Settings

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".json": "application/json",
}

# Cache-Control by what an object is and whether it still changes. A live
# playlist changes at every segment: a CDN may hold it a second at most. VOD
# (a finished job) never changes: segments and images are immutable, its
# playlists are final too but are given a day in case a job is run again.
CACHE_LIVE_PLAYLIST = "public, max-age=1"
CACHE_LIVE_MEDIA = "public, max-age=86400"
CACHE_VOD_PLAYLIST = "public, max-age=86400"
CACHE_VOD_MEDIA = "public, max-age=31536000, immutable"


def content_type(key: str) -> str:
    return CONTENT_TYPES.get(PurePosixPath(key).suffix.lower(), "application/octet-stream")


def cache_control(key: str, *, live: bool) -> str:
    playlist = key.endswith(".m3u8")
    if live:
        return CACHE_LIVE_PLAYLIST if playlist else CACHE_LIVE_MEDIA
    return CACHE_VOD_PLAYLIST if playlist else CACHE_VOD_MEDIA


def join_key(*parts: str) -> str:
    """Keys joined with one slash between parts (a prefix may or may not end in one)."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class StorageError(Exception):
    """A storage operation that failed for good (after its retries). `reason`
    says which part is wrong, for the user: credentials, bucket, endpoint,
    access (a permission), refused (anything else the store answered)."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the storage's root
    size: int
    modified: float  # unix seconds


class MediaStorage(ABC):
    """Publishes and serves media by key. Blocking; thread-safe."""

    kind: str = ""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, live: bool = False) -> None:
        """Store a closed file's bytes under `key` (Content-Type from its name,
        Cache-Control by `live`), replacing what was there."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, live: bool = False) -> None:
        """Store `data` under `key` (a playlist as it was written)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""

    @abstractmethod
    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete these objects (missing ones are no error)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (a task's folder); how many."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under `prefix`, keys relative to the storage's root."""

    @abstractmethod
    def url(self, key: str) -> str:
        """The URL a player fetches the object from."""

    def check(self) -> None:
        """Raise StorageError naming what is wrong (credentials, bucket,
        endpoint) when the storage cannot be used; nothing to check locally."""

    def close(self) -> None:
        """Release connections."""


class LocalStorage(MediaStorage):
    """The media root on this node's disk, served under `<public url>/media`."""

    kind = "local"

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key outside the media root: {key!r}")
        return path

    def put_file(self, key: str, path: Path, *, live: bool = False) -> None:
        dest = self._path(key)
        if dest == Path(path).resolve():
            return  # written in place: already published
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, key: str, data: bytes, *, live: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def delete_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix)
        count = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path, ignore_errors=True)
        return count

    def list_objects(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix)
        root = self.root.resolve()
        out = []
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out.append(StoredObject(p.relative_to(root).as_posix(), st.st_size, st.st_mtime))
        return out

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}"


# --- a finished tree at once (file jobs) -------------------------------------------------------

def tree_phases(local_dir: Path) -> list[list[Path]]:
    """The files of a media tree in upload order: segments and images, then
    the rendition playlists, then the master playlist (hidden temp files are
    not media)."""
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    # largest first: the phase ends with small files, not with one big one still going up alone
    media = sorted((p for p in files if p.suffix != ".m3u8"), key=lambda p: -p.stat().st_size)
    playlists = [p for p in files if p.suffix == ".m3u8" and p.parent != local_dir]
    masters = [p for p in files if p.suffix == ".m3u8" and p.parent == local_dir]
    return [phase for phase in (media, playlists, masters) if phase]


@dataclass
class UploadStats:
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0


def upload_tree(storage: MediaStorage, local_dir: Path, key_prefix: str, *, concurrency: int = 4,
                live: bool = False, done: Callable[[str], bool] = lambda key: False) -> UploadStats:
    """Upload every file under `local_dir` to `<key_prefix>/<relative path>`,
    `concurrency` at a time, phase by phase (tree_phases); `done(key)` skips
    what is uploaded already. The first failure (after the storage's own
    retries) stops the rest and is raised."""
    stats = UploadStats()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool:
        for phase in tree_phases(local_dir):
            jobs = []
            for path in phase:
                key = join_key(key_prefix, path.relative_to(local_dir).as_posix())
                if done(key):
                    continue
                jobs.append(pool.submit(storage.put_file, key, path, live=live))
                stats.objects += 1
                stats.bytes += path.stat().st_size
            finished, pending = wait(jobs, return_when=FIRST_EXCEPTION)
            for fut in pending:
                fut.cancel()
            for fut in finished:
                fut.result()  # raises the first failure
    stats.seconds = time.monotonic() - t0
    return stats


class TreeUpload:
    """A job's tree going up while it is written: closed files as they come
    (`submit`, from any thread, never blocking), everything else at the end
    (`finish`, which also uploads again what failed on the way); only then
    the playlists, so a reader of the bucket never meets a playlist before
    its segments. The first upload that fails past its retries stops the
    ones still queued (a store that is gone costs one retry budget, not one
    per file); `finish` then tries the rest once more, unless the store
    refused for good (credentials, bucket, permission)."""

    def __init__(self, storage: MediaStorage, local_dir: Path, concurrency: int = 4) -> None:
        self.storage = storage
        self.local_dir = Path(local_dir)
        self.concurrency = concurrency
        self.stored: set[str] = set()
        self.failed: StorageError | None = None
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload")
        self._futures: list = []

    def submit(self, paths: Iterable[Path]) -> None:
        for path in paths:
            key = Path(path).relative_to(self.local_dir).as_posix()
            self._futures.append(self._pool.submit(self._put, key, Path(path)))

    def _put(self, key: str, path: Path) -> None:
        if self.failed is not None:  # the store failed past its retries: `finish` tries once more, not each file
            return
        try:
            self.storage.put_file(key, path)
            self.stored.add(key)
        except StorageError as err:
            self.failed = err

    def finish(self) -> UploadStats:
        """Blocking: wait for the uploads on the way, then upload the rest."""
        wait(self._futures)
        self._pool.shutdown()
        if self.failed is not None and not self.failed.retryable:
            raise self.failed
        return upload_tree(self.storage, self.local_dir, "", concurrency=self.concurrency,
                           done=lambda key: key in self.stored)

    def abort(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- a live task's files as they close ----------------------------------------------------------

@dataclass
class _Put:
    key: str
    path: Path | None = None  # a closed file
    data: bytes | None = None  # a playlist, as written (it is rewritten after)


_CLOSE = object()


@dataclass
class MirrorStats:
    uploaded: int = 0
    failures: int = 0  # attempts that failed after the storage's retries (each retried again)
    pending: int = 0


class MediaMirror:
    """Publishes one live task's media to a storage as it is written: one
    worker thread, first in first out, so a segment is stored before the
    playlist that lists it. A put that fails is retried (after the storage's
    own backoff) until it succeeds or the mirror is closed: the local file is
    still there, and the playlists wait behind it. Callers (the ingest
    thread) never block on the network."""

    def __init__(self, storage: MediaStorage, task_dir: Path, key_prefix: str,
                 on_failure: Callable[[StorageError], None] = lambda err: None,
                 may_put: Callable[[], bool] = lambda: True) -> None:
        """`may_put`: asked before each put; false drops it (the task passed to
        another node, whose media this node must not overwrite)."""
        self.storage = storage
        self.may_put = may_put
        self.task_dir = Path(task_dir)
        self.key_prefix = key_prefix
        self.on_failure = on_failure
        self.stats = MirrorStats()
        self._lock = threading.Lock()  # stats are counted from the ingest thread and the worker
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.task_dir.name}", daemon=True)
        self._thread.start()

    def key(self, path: Path) -> str:
        return join_key(self.key_prefix, Path(path).relative_to(self.task_dir).as_posix())

    def file_written(self, path: Path) -> None:
        """A closed segment or image: stored as it is on disk."""
        self._put(_Put(self.key(path), path=Path(path)))

    def text_written(self, path: Path, text: str) -> None:
        """A playlist as just written (a snapshot: the file is rewritten later)."""
        self._put(_Put(self.key(path), data=text.encode()))

    def _put(self, item: _Put) -> None:
        self._count("pending", 1)
        self._queue.put(item)

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _CLOSE:
            delay = 1.0
            while self.may_put() or self._dropped(item):
                try:
                    if item.data is not None:
                        self.storage.put_bytes(item.key, item.data, live=True)
                    else:
                        assert item.path is not None
                        self.storage.put_file(item.key, item.path, live=True)
                    self._count("uploaded", 1)
                    break
                except FileNotFoundError:
                    break  # deleted meanwhile (retention): nothing to publish
                except StorageError as err:
                    self._count("failures", 1)
                    self.on_failure(err)
                    if self._closing.wait(delay) or not err.retryable:
                        log.error("media of %s: %s not stored: %s", self.task_dir.name, item.key, err.message)
                        break
                    delay = min(delay * 2, 30.0)
            self._count("pending", -1)

    def _dropped(self, item: _Put) -> bool:
        log.warning("media of %s: %s not stored: the task is no longer this node's", self.task_dir.name, item.key)
        return False

    def close(self, timeout: float) -> bool:
        """Flush what is queued (at most `timeout` seconds), then stop. True
        when everything was stored."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._closing.set()  # give up retrying: the task has ended
            self._thread.join(5.0)
        return self.stats.pending == 0


@dataclass(frozen=True)
class S3Target:
    """An S3-compatible bucket and prefix, with its credentials: a job's
    s3Config, a project's default or the node's [storage.s3]. The secret
    never appears in its repr."""

    bucket: str
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    region: str = ""
    endpoint: str = ""
    prefix: str = ""
    public_url: str = ""  # cdnUrl: the base URL objects are served under

    def s3_base_url(self) -> str:
        """The bucket's own URL: path-style under a custom endpoint, else AWS's virtual-host form."""
        if self.endpoint:
            return f"{self.endpoint.rstrip('/')}/{self.bucket}"
        return f"https://{self.bucket}.s3.{self.region or 'us-east-1'}.amazonaws.com"

    def object_url(self, key: str) -> str:
        """The public URL of a key under the prefix: cdnUrl when set, else the S3 URL."""
        base = (self.public_url or self.s3_base_url()).rstrip("/")
        return f"{base}/{join_key(self.prefix, key)}"

    def scrub(self, text: str) -> str:
        """Text (an error from the store or the client) without the secret in it."""
        return text.replace(self.secret_key, "***") if self.secret_key else text


def open_s3(target: S3Target, settings: "S3Settings") -> MediaStorage:
    """An S3Storage for `target` with the node's upload settings (boto3 is
    imported only by nodes that use S3)."""
    from .s3 import S3Storage
    return S3Storage(target, retry_seconds=settings.retry_seconds, multipart_mb=settings.multipart_mb,
                     concurrency=settings.concurrency)


def node_target(settings: "S3Settings") -> S3Target:
    """The node's own bucket ([storage.s3]), its secret read from env or file."""
    return S3Target(bucket=settings.bucket, access_key=settings.access_key, secret_key=settings.resolved_secret(),
                    region=settings.region, endpoint=settings.endpoint, prefix=settings.prefix,
                    public_url=settings.public_url)


def node_storage(media: str, s3: "S3Settings", media_root: Path, public_url: str) -> MediaStorage:
    """The node's media storage (storage.media): the local media root served
    under /media, or the [storage.s3] bucket."""
    if media == "s3":
        return open_s3(node_target(s3), s3)
    return LocalStorage(media_root, f"{public_url.rstrip('/')}/media")
