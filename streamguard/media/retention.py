"""Bounded disk for live media: retention sweeps and the free-space floor.

Policy (CONTRACT §5, README "Disk"): live media is deleted
`storage.media_retention_hours` after it was written. A running task loses
the segment files that left its playlist's sliding window and are older than
that (a file its playlist still lists is never deleted, so a player never
meets a 404 inside the window); a stopped task loses its whole media folder
once that long has passed since its playlists were last written.

Below `storage.min_free_bytes` the store has priority over media: the sweep
evicts stopped tasks' media oldest first, new tasks are refused (503) and
running tasks stop writing segment files (their records are still moderated
and stored) until space is back.

On a node whose media storage is S3 (storage.media = "s3") the same policy
applies in the bucket: each deleted segment file and task folder is deleted
there too (`mirror`), so the bucket holds no more than the node's disk.

Everything here is blocking file-system (and S3) work: the runtime calls
`sweep` in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .hls import segment_name
from .storage import MediaStorage, StorageError

log = logging.getLogger(__name__)

PLAYLIST = "playlist.m3u8"


def statvfs_free(path: Path) -> int:
    """Bytes an unprivileged process can still write on path's file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskSpace:
    """Free space under the data dir against the configured floor.

    `measure` is the one injectable part (default: statvfs); the floor itself
    is a setting, so a floor above the real free space triggers it for real.
    Readings are cached for `ttl` seconds: every segment of every task asks."""

    def __init__(self, path: Path, min_free_bytes: int, *, measure: Callable[[Path], int] = statvfs_free,
                 ttl: float = 1.0) -> None:
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self._measure = measure
        self._ttl = ttl
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._free = 0

    def free_bytes(self, *, fresh: bool = False) -> int:
        with self._lock:
            now = time.monotonic()
            if fresh or now - self._at >= self._ttl:
                self._free, self._at = self._measure(self.path), now
            return self._free

    def low(self, *, fresh: bool = False) -> bool:
        return self.min_free_bytes > 0 and self.free_bytes(fresh=fresh) < self.min_free_bytes

    def ok(self) -> bool:
        """May media be written now? (LiveMedia.may_write)"""
        return not self.low()

    def reason(self) -> str | None:
        """Why the node is below the floor, or None."""
        free = self.free_bytes()
        if self.min_free_bytes <= 0 or free >= self.min_free_bytes:
            return None
        return (f"free disk space under {self.path} is {_human(free)}, below storage.min_free_bytes "
                f"({_human(self.min_free_bytes)})")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class SweepResult:
    files_deleted: int = 0
    dirs_deleted: int = 0
    bytes_freed: int = 0
    evicted: list[str] = field(default_factory=list)  # stopped tasks evicted early for space


def segment_index(name: str) -> int | None:
    """segment_NNN.ts -> NNN (any number of digits)."""
    if name.startswith("segment_") and name.endswith(".ts") and name[8:-3].isdigit():
        return int(name[8:-3])
    return None


def first_listed(playlist: Path) -> int | None:
    """Index of the oldest segment a playlist lists (indices only grow down a
    playlist), or None when it lists none."""
    try:
        text = playlist.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if (index := segment_index(line)) is not None:
            return index
    return None


def last_written(task_dir: Path) -> float:
    """When a task's media last changed: its newest playlist (rewritten at
    every segment and at the end), else the folder itself."""
    times = [task_dir.stat().st_mtime]
    for p in (task_dir / "master.m3u8", *task_dir.glob(f"*/{PLAYLIST}")):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


def tree_size(path: Path) -> int:
    """Bytes in the files under `path` (files deleted meanwhile count as 0)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class MediaRetention:
    def __init__(self, media_root: Path, retention_seconds: float, disk: DiskSpace,
                 mirror: MediaStorage | None = None) -> None:
        self.media_root = Path(media_root)
        self.mirror = mirror  # where the media is published (S3): deleted there too
        self.retention_seconds = retention_seconds
        self.disk = disk
        # Per running rendition folder: the lowest segment index that may still
        # exist, so a sweep looks only at what is new since the last one (a
        # task with 72 h retention holds ~130k files at 2 s segments).
        self._cursor: dict[Path, int] = {}

    def sweep(self, running: Iterable[str], now: float | None = None) -> SweepResult:
        """One pass over the media root. `running`: ids of the tasks whose
        pipelines are live in this process (their folders are trimmed, never
        removed)."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_seconds
        running = set(running)
        result = SweepResult()
        if not self.media_root.is_dir():
            return result
        ended: list[tuple[float, Path]] = []
        self._cursor = {k: v for k, v in self._cursor.items() if k.parent.name in running}
        for task_dir in self.media_root.iterdir():
            if not task_dir.is_dir():
                continue
            try:
                if task_dir.name in running:
                    self._trim(task_dir, cutoff, result)
                    continue
                written = last_written(task_dir)
            except FileNotFoundError:
                continue  # removed meanwhile
            if written < cutoff:
                self._remove(task_dir, result)
            else:
                ended.append((written, task_dir))
        if self.disk.low(fresh=True):
            self._evict(sorted(ended), result)
        return result

    def _trim(self, task_dir: Path, cutoff: float, result: SweepResult) -> None:
        """A running task: delete the segment files older than the cut-off
        that come before the first one its playlist lists. The playlist is
        read first and a window only slides forward, so nothing it lists, now
        or later, is deleted."""
        for rendition in (d for d in task_dir.iterdir() if d.is_dir()):
            first = first_listed(rendition / PLAYLIST)
            if first is None:
                continue  # nothing listed yet: nothing has slid out either
            index = self._cursor.get(rendition)
            if index is None:  # first sweep of this folder (e.g. after a restart): one full listing
                found = [i for e in os.scandir(rendition) if (i := segment_index(e.name)) is not None]
                index = min(found, default=first)
            gone: list[str] = []
            while index < first:
                path = rendition / segment_name(index)
                try:
                    st = path.stat()
                except FileNotFoundError:  # never written (disk below the floor) or already gone
                    index += 1
                    continue
                if st.st_mtime >= cutoff:
                    break  # files are written in index order: the rest are younger
                path.unlink(missing_ok=True)
                gone.append(f"{task_dir.name}/{rendition.name}/{path.name}")
                result.files_deleted += 1
                result.bytes_freed += st.st_size
                index += 1
            self._cursor[rendition] = index
            self._unpublish(lambda m: m.delete_keys(gone), gone)

    def _unpublish(self, delete: Callable[[MediaStorage], object], what: object) -> None:
        """Delete what retention deleted locally from the published copy too;
        a store that fails now is logged (the objects outlive their retention)."""
        if self.mirror is None or not what:
            return
        try:
            delete(self.mirror)
        except StorageError as err:
            log.warning("media retention: not deleted from the media storage: %s", err.message)

    def _remove(self, task_dir: Path, result: SweepResult) -> None:
        size = tree_size(task_dir)
        shutil.rmtree(task_dir, ignore_errors=True)
        self._unpublish(lambda m: m.delete_prefix(task_dir.name), task_dir.name)
        result.dirs_deleted += 1
        result.bytes_freed += size

    def _evict(self, ended: list[tuple[float, Path]], result: SweepResult) -> None:
        """Below the floor: stopped tasks' media goes, oldest first, until
        there is room again (running tasks keep what they list)."""
        for _, task_dir in ended:
            if not self.disk.low(fresh=True):
                break
            log.warning("disk below the floor: evicting the media of stopped task %s early", task_dir.name)
            self._remove(task_dir, result)
            result.evicted.append(task_dir.name)
