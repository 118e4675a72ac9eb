"""The embedded store: SQLite in WAL mode.

Writes go through one connection owned by one thread; `AsyncStore` runs every
call there, so the event loop never blocks on disk and writes are serialised
without lock contention. Reads marked `@reads` run on a second connection and
thread: WAL readers never wait for a writer, so status queries keep answering
while a write waits on a lock (`database is locked`, another process holding
the database). Money-like updates (token balances) and
the records they pay for change in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from .migrations import MIGRATIONS

T = TypeVar("T")
KEY_PREFIX = "sg_"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    import base64
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    webhook_url: str | None
    webhook_events: list[str]
    webhook_secret: str
    created_at: float
    previous_secret: str | None = None
    previous_secret_expires_at: float | None = None
    # Default S3 output of its jobs (PUT /v1/project/storage): JSON with the
    # secret key sealed (secretbox), never in clear.
    storage: str | None = None

    def signing_secrets(self, now: float) -> list[str]:
        """The current secret, plus the previous one during its grace period."""
        secrets_ = [self.webhook_secret]
        if self.previous_secret and (self.previous_secret_expires_at or 0) > now:
            secrets_.append(self.previous_secret)
        return secrets_


@dataclass(frozen=True)
class KeyInfo:
    id: str
    project_id: str
    prefix: str
    balance: int | None
    revoked: bool


@dataclass(frozen=True)
class Principal:
    """Who is calling: the authenticated key and its project."""

    key_id: str
    project_id: str
    balance: int | None


@dataclass
class TaskRow:
    id: str
    project_id: str
    key_id: str
    kind: str
    url: str
    params: dict[str, Any]
    state: str
    final_status: int | None = None
    final_message: str | None = None
    segments: int = 0
    flagged_segments: int = 0
    tokens: int = 0
    reconnects: int = 0
    next_seq: int = 0
    timeline_end: float = 0.0
    created_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None
    # Ownership (store/leases): the node that runs it, the fencing token of
    # its claim (+1 at each claim; 0: assigned, not claimed yet), the time its
    # lease runs out (the owner renews it before), and its capacity slots.
    node: str | None = None
    epoch: int = 0
    lease_until: float | None = None
    weight: int = 1


_TASK_COLS = ("id, project_id, key_id, kind, url, params, state, final_status, final_message, segments, "
              "flagged_segments, tokens, reconnects, next_seq, timeline_end, created_at, started_at, stopped_at, "
              "node, epoch, lease_until, weight")


def _task(row: tuple) -> TaskRow:
    values = list(row)
    values[5] = json.loads(values[5])
    return TaskRow(*values)


@dataclass
class JobRow:
    """A file job: its `tasks` row (input URL, settings, counters) and its `jobs` row."""

    task: TaskRow
    status: str
    progress: float
    attempts: int
    input_path: str | None
    outputs: list[str] | None
    duration: float | None
    summary: dict[str, Any] | None
    video_tokens: int
    text_tokens: int
    error_code: str | None
    error_message: str | None
    completed_at: float | None
    storage: str | None = None  # its S3 output (JSON, secret sealed), None: /media on this node

    @property
    def id(self) -> str:
        return self.task.id


_JOB_SELECT = ("SELECT " + ", ".join(f"t.{c.strip()}" for c in _TASK_COLS.split(",")) +
               ", j.status, j.progress, j.attempts, j.input_path, j.outputs, j.duration, j.summary, j.video_tokens, "
               "j.text_tokens, j.error_code, j.error_message, j.completed_at, j.storage "
               "FROM tasks t JOIN jobs j ON j.id = t.id ")
_TASK_N = len(_TASK_COLS.split(","))


def _job(row: tuple) -> JobRow:
    task, rest = _task(row[:_TASK_N]), list(row[_TASK_N:])
    rest[4] = json.loads(rest[4]) if rest[4] is not None else None  # outputs
    rest[6] = json.loads(rest[6]) if rest[6] is not None else None  # summary
    return JobRow(task, *rest)


# Builds a job's events from its row as just updated, inside the transaction that updated it.
JobEvents = Callable[["Store", JobRow], "list[OutboxItem]"]


class InsufficientBalance(Exception):
    pass


class KeyRevoked(Exception):
    """The key was revoked (possibly by another process: `streamguard keys revoke`)."""


class LeaseLost(Exception):
    """A write for a task from a claim that is no longer current (its epoch is
    stale: another node took the task over); nothing was written."""


def _fence(epoch: int | None) -> tuple[str, tuple]:
    """The WHERE clause that refuses a write from a stale claim (none when the caller holds no claim)."""
    return ("", ()) if epoch is None else (" AND epoch = ?", (epoch,))


@dataclass(frozen=True)
class Claimant:
    """A node claiming work: its id, the clock it claims by, when its new
    leases run out, and whether it may take any owner's work (a single node on
    SQLite: whatever a previous process left is its own)."""

    node: str
    now: float
    lease_until: float
    any_owner: bool = False

    def claimable(self, alias: str = "") -> tuple[str, tuple]:
        """SQL condition (and its arguments) for a task row this claimant may take."""
        if self.any_owner:
            return "1 = 1", ()
        a = f"{alias}." if alias else ""
        return (f"({a}node = ? OR {a}node IS NULL OR {a}lease_until IS NULL OR {a}lease_until < ?)",
                (self.node, self.now))


def _claimed(claim: str | None) -> tuple[str, tuple]:
    return ("", ()) if claim is None else (" AND claimed_by = ?", (claim,))


def reads(fn: Callable[..., T]) -> Callable[..., T]:
    """Marks a Store method that only reads: AsyncStore runs it on the reader connection."""
    fn.__streamguard_reads__ = True  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class OutboxItem:
    """One event for one destination, written with the data it reports."""

    event_id: str
    project_id: str
    task_id: str | None
    url: str
    event: str
    body: bytes
    # Ordering scope within the task (None: the task's own, shared by its
    # records and lifecycle events). Alerts are a stream of their own, so they
    # never wait behind a record queued for a slow receiver.
    stream: str | None = None


@dataclass
class DeliveryRow:
    n: int
    id: str
    event_id: str
    project_id: str
    task_id: str | None
    url: str
    stream_key: str
    event: str
    body: bytes
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_status_code: int | None
    created_at: float
    delivered_at: float | None


_DELIVERY_COLS = ("n, id, event_id, project_id, task_id, url, stream_key, event, body, status, attempts, "
                  "next_attempt_at, last_error, last_status_code, created_at, delivered_at")


class Store:
    """Synchronous store; use it from one thread (AsyncStore does that).

    Its SQL is the one SQL of both backends (store/postgres.py runs these same
    methods on PostgreSQL): `?` placeholders, portable functions (GREATEST,
    not two-argument MAX), `ON CONFLICT`/`RETURNING`, columns qualified in
    upserts, and the row-locking clauses below, which are empty here (a
    SQLite write transaction already excludes every other writer)."""

    LOCK_ROWS = ""       # PostgreSQL: FOR UPDATE
    SKIP_LOCKED = ""     # PostgreSQL: FOR UPDATE SKIP LOCKED

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        # PostgreSQL's GREATEST and LEAST (NULLs ignored), so that one SQL serves both.
        self.db.create_function("GREATEST", -1, lambda *a: max((x for x in a if x is not None), default=None),
                                deterministic=True)
        self.db.create_function("LEAST", -1, lambda *a: min((x for x in a if x is not None), default=None),
                                deterministic=True)
        self._migrate()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def writable(self) -> bool:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False

    def _tx(self) -> "_Transaction":
        return _Transaction(self.db)

    # --- projects and keys ---------------------------------------------------

    _PROJECT = ("SELECT id, name, webhook_url, webhook_events, webhook_secret, created_at, previous_secret, "
                "previous_secret_expires_at, storage FROM projects WHERE ")

    @staticmethod
    def _project(row: tuple | None) -> Project | None:
        if row is None:
            return None
        return Project(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7], row[8])

    def project_by_name(self, name: str, create: bool = False) -> Project | None:
        row = self.db.execute(self._PROJECT + "name = ?", (name,)).fetchone()
        if row is None and create:
            pid = new_id("prj")
            self.db.execute("INSERT INTO projects (id, name, webhook_secret, created_at) VALUES (?, ?, ?, ?)",
                            (pid, name, new_webhook_secret(), time.time()))
            return self.project(pid)
        return self._project(row)

    @reads
    def project(self, project_id: str) -> Project | None:
        return self._project(self.db.execute(self._PROJECT + "id = ?", (project_id,)).fetchone())

    def rotate_secret(self, project_id: str, grace_seconds: float) -> Project:
        self.db.execute("UPDATE projects SET previous_secret = webhook_secret, previous_secret_expires_at = ?, "
                        "webhook_secret = ? WHERE id = ?", (time.time() + grace_seconds, new_webhook_secret(),
                                                            project_id))
        project = self.project(project_id)
        assert project is not None
        return project

    def set_webhook(self, project_id: str, url: str | None, events: list[str]) -> Project:
        self.db.execute("UPDATE projects SET webhook_url = ?, webhook_events = ? WHERE id = ?",
                        (url, json.dumps(events), project_id))
        project = self.project(project_id)
        assert project is not None
        return project

    def set_project_storage(self, project_id: str, storage: str | None) -> Project:
        self.db.execute("UPDATE projects SET storage = ? WHERE id = ?", (storage, project_id))
        project = self.project(project_id)
        assert project is not None
        return project

    def sealed_storage(self) -> list[tuple[str, str, str]]:
        """Every stored S3 output that holds a sealed secret: (table, id, JSON)."""
        rows = self.db.execute("SELECT 'projects', id, storage FROM projects WHERE storage IS NOT NULL "
                               "UNION ALL SELECT 'jobs', id, storage FROM jobs WHERE storage IS NOT NULL").fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def reseal_storage(self, updates: list[tuple[str, str, str]]) -> None:
        """Write back re-encrypted storage JSON (keys rotate-secret-key), in one transaction."""
        with self._tx():
            for table, row_id, storage in updates:
                assert table in ("projects", "jobs")
                self.db.execute(f"UPDATE {table} SET storage = ? WHERE id = ?", (storage, row_id))

    def create_key(self, project_name: str, balance: int | None = None) -> tuple[str, KeyInfo]:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx():
            project = self.project_by_name(project_name, create=True)
            assert project is not None
            kid = new_id("key")
            self.db.execute("INSERT INTO api_keys (id, project_id, key_hash, prefix, balance, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (kid, project.id, hash_key(key), key[:10], balance, time.time()))
        return key, KeyInfo(kid, project.id, key[:10], balance, False)

    def _key_row(self, key_or_id: str) -> tuple | None:
        return self.db.execute(
            "SELECT id, project_id, prefix, balance, revoked_at FROM api_keys WHERE id = ? OR key_hash = ?",
            (key_or_id, hash_key(key_or_id))).fetchone()

    def key_info(self, key_or_id: str) -> KeyInfo | None:
        row = self._key_row(key_or_id)
        return None if row is None else KeyInfo(row[0], row[1], row[2], row[3], row[4] is not None)

    def revoke_key(self, key_or_id: str) -> bool:
        row = self._key_row(key_or_id)
        if row is None:
            return False
        self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                        (time.time(), row[0]))
        return True

    def set_balance(self, key_or_id: str, balance: int | None) -> KeyInfo | None:
        row = self._key_row(key_or_id)
        if row is None:
            return None
        self.db.execute("UPDATE api_keys SET balance = ? WHERE id = ?", (balance, row[0]))
        return self.key_info(row[0])

    @reads
    def authenticate(self, key: str) -> Principal | None:
        row = self.db.execute("SELECT id, project_id, balance FROM api_keys "
                              "WHERE key_hash = ? AND revoked_at IS NULL", (hash_key(key),)).fetchone()
        return None if row is None else Principal(row[0], row[1], row[2])

    @reads
    def _revoked(self, key_id: str) -> bool:
        row = self.db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return row is None or row[0] is not None

    @reads
    def revoked_keys(self, key_ids: list[str]) -> set[str]:
        """Those of these keys that were revoked (or no longer exist)."""
        if not key_ids:
            return set()
        marks = ", ".join("?" * len(key_ids))
        live = {r[0] for r in self.db.execute(
            f"SELECT id FROM api_keys WHERE id IN ({marks}) AND revoked_at IS NULL", key_ids)}
        return set(key_ids) - live

    def _charge(self, key_id: str, cost: int) -> None:
        """Take `cost` from the key's balance inside the caller's transaction;
        InsufficientBalance when it cannot pay (an unmetered key always can)."""
        if cost:
            cur = self.db.execute("UPDATE api_keys SET balance = balance - ? "
                                  "WHERE id = ? AND (balance IS NULL OR balance >= ?)", (cost, key_id, cost))
            if cur.rowcount == 0:
                raise InsufficientBalance(key_id)

    def balance(self, key_id: str) -> int | None:
        row = self.db.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else row[0]

    # --- tasks ----------------------------------------------------------------

    def create_task(self, task: TaskRow, outbox: list[OutboxItem] = ()) -> None:  # type: ignore[assignment]
        with self._tx():
            self._insert_task(task)
            self._enqueue(outbox)

    def _insert_task(self, task: TaskRow) -> None:
        self.db.execute(f"INSERT INTO tasks ({_TASK_COLS}) VALUES ({', '.join('?' * _TASK_N)})", (
            task.id, task.project_id, task.key_id, task.kind, task.url, json.dumps(task.params), task.state,
            task.final_status, task.final_message, task.segments, task.flagged_segments, task.tokens,
            task.reconnects, task.next_seq, task.timeline_end, task.created_at, task.started_at,
            task.stopped_at, task.node, task.epoch, task.lease_until, task.weight))

    @reads
    def task(self, task_id: str, project_id: str | None = None) -> TaskRow | None:
        sql = f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?"
        args: tuple = (task_id,)
        if project_id is not None:
            sql += " AND project_id = ?"
            args += (project_id,)
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else _task(row)

    @reads
    def list_tasks(self, project_id: str, kind: str, state: str | None, page: int,
                   page_size: int) -> tuple[list[TaskRow], int]:
        rows, total = self._page(f"SELECT {_TASK_COLS} FROM tasks", "project_id = ? AND kind = ?",
                                 [project_id, kind], ("state", state), "created_at DESC, id", page, page_size)
        return [_task(r) for r in rows], total

    def _page(self, select: str, where: str, args: list[Any], match: tuple[str, str | None], order: str,
              page: int, page_size: int) -> tuple[list[tuple], int]:
        """One page of `select ... WHERE where` (plus `column = value` when the
        optional filter `match` has a value) and the count of all that match."""
        column, value = match
        if value:
            where, args = f"{where} AND {column} = ?", [*args, value]
        source = select.split(" FROM ", 1)[1]
        total = self.db.execute(f"SELECT COUNT(*) FROM {source} WHERE {where}", args).fetchone()[0]
        rows = self.db.execute(f"{select} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                               [*args, page_size, (page - 1) * page_size]).fetchall()
        return rows, total

    # --- standalone jobs (issue 11) --------------------------------------------------

    def save_standalone_job(self, job_id: str, project_id: str, key_id: str, kind: str, status: str,
                            body: bytes, cost: int, outbox: list[OutboxItem]) -> None:
        """A standalone job's state, its charge and its events in one
        transaction; InsufficientBalance (nothing written) when the key cannot pay `cost`."""
        with self._tx():
            self._charge(key_id, cost)
            self.db.execute(
                "INSERT INTO standalone_jobs (id, project_id, key_id, kind, status, body, tokens, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = excluded.status, "
                "body = excluded.body, tokens = standalone_jobs.tokens + excluded.tokens",
                (job_id, project_id, key_id, kind, status, body, cost, time.time()))
            self._enqueue(outbox)

    @reads
    def standalone_job(self, job_id: str, project_id: str, kind: str) -> bytes | None:
        row = self.db.execute("SELECT body FROM standalone_jobs WHERE id = ? AND project_id = ? AND kind = ?",
                              (job_id, project_id, kind)).fetchone()
        return None if row is None else row[0]

    @reads
    def list_standalone_jobs(self, project_id: str, kind: str, status: str | None, page: int,
                             page_size: int) -> tuple[list[bytes], int]:
        rows, total = self._page("SELECT body FROM standalone_jobs", "project_id = ? AND kind = ?",
                                 [project_id, kind], ("status", status), "created_at DESC, id", page, page_size)
        return [r[0] for r in rows], total

    # --- the logo gallery (issue 12) -------------------------------------------------

    def add_logo_image(self, project_id: str, name: str, images: list[tuple[str, str, bytes]], fingerprint: str,
                       dim: int, *, max_logos: int, max_images: int) -> str | None:
        """Add reference images (id, path relative to the data dir, float32
        embeddings) to the project's logo `name`, creating it if new; returns
        the logo's id, or None (nothing written) past a limit."""
        now = time.time()
        with self._tx():
            row = self.db.execute("SELECT id FROM logos WHERE project_id = ? AND name = ?",
                                  (project_id, name)).fetchone()
            logos = self.db.execute("SELECT COUNT(*) FROM logos WHERE project_id = ?", (project_id,)).fetchone()[0]
            have = 0 if row is None else self.db.execute(
                "SELECT COUNT(*) FROM logo_images WHERE logo_id = ?", (row[0],)).fetchone()[0]
            if (row is None and logos >= max_logos) or have + len(images) > max_images:
                return None
            logo_id = new_id("logo") if row is None else row[0]
            if row is None:
                self.db.execute("INSERT INTO logos (id, project_id, name, created_at) VALUES (?, ?, ?, ?)",
                                (logo_id, project_id, name, now))
            for image_id, path, blob in images:
                self.db.execute("INSERT INTO logo_images (id, logo_id, path, created_at) VALUES (?, ?, ?, ?)",
                                (image_id, logo_id, path, now))
                self.db.execute("INSERT INTO logo_embeddings (image_id, fingerprint, dim, embeddings) "
                                "VALUES (?, ?, ?, ?)", (image_id, fingerprint, dim, blob))
        return logo_id

    @reads
    def logos(self, project_id: str, page: int, page_size: int,
              logo_id: str | None = None) -> tuple[list[tuple[str, str, float, list[tuple[str, float]]]], int]:
        """A page of the project's logos (or the one `logo_id`), oldest first:
        (id, name, created_at, [(image id, created_at)])."""
        where, args = "project_id = ?", [project_id]
        if logo_id is not None:
            where, args = f"{where} AND id = ?", [*args, logo_id]
        rows, total = self._page("SELECT id, name, created_at FROM logos", where, args, ("name", None),
                                 "created_at, id", page, page_size)
        out = []
        for lid, name, created in rows:
            images = self.db.execute("SELECT id, created_at FROM logo_images WHERE logo_id = ? ORDER BY created_at, id",
                                     (lid,)).fetchall()
            out.append((lid, name, created, [(i, c) for i, c in images]))
        return out, total

    @reads
    def logo_counts(self) -> dict[str, int]:
        """Per project with logos, how many."""
        return dict(self.db.execute("SELECT project_id, COUNT(*) FROM logos GROUP BY project_id").fetchall())

    def delete_logo(self, logo_id: str, project_id: str) -> list[str] | None:
        """Delete a logo with its images and embeddings; returns its image
        paths (to delete from disk), or None when the project has no such logo."""
        with self._tx():
            row = self.db.execute("SELECT id FROM logos WHERE id = ? AND project_id = ?",
                                  (logo_id, project_id)).fetchone()
            if row is None:
                return None
            paths = [p for (p,) in self.db.execute("SELECT path FROM logo_images WHERE logo_id = ?", (logo_id,))]
            self.db.execute("DELETE FROM logo_embeddings WHERE image_id IN "
                            "(SELECT id FROM logo_images WHERE logo_id = ?)", (logo_id,))
            self.db.execute("DELETE FROM logo_images WHERE logo_id = ?", (logo_id,))
            self.db.execute("DELETE FROM logos WHERE id = ?", (logo_id,))
        return paths

    @reads
    def gallery(self, project_id: str, fingerprint: str) -> list[tuple[str, str, str, str, bytes | None]]:
        """Every reference image of the project's logos: (logo id, name, image
        id, path, its embeddings for this model or None when not cached)."""
        return self.db.execute(
            "SELECT l.id, l.name, i.id, i.path, e.embeddings FROM logos l JOIN logo_images i ON i.logo_id = l.id "
            "LEFT JOIN logo_embeddings e ON e.image_id = i.id AND e.fingerprint = ? "
            "WHERE l.project_id = ? ORDER BY l.created_at, l.id, i.created_at, i.id",
            (fingerprint, project_id)).fetchall()

    def save_logo_embeddings(self, rows: list[tuple[str, str, int, bytes]]) -> None:
        """(image id, fingerprint, dim, embeddings): cached for a model."""
        with self._tx():
            self.db.executemany("INSERT INTO logo_embeddings (image_id, fingerprint, dim, embeddings) "
                                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM logo_images WHERE id = ?) "
                                "ON CONFLICT (image_id, fingerprint) "
                                "DO UPDATE SET dim = excluded.dim, embeddings = excluded.embeddings",
                                [(i, f, d, b, i) for i, f, d, b in rows])

    def tasks_in_state(self, *states: str, kind: str = "stream") -> list[TaskRow]:
        marks = ", ".join("?" * len(states))
        rows = self.db.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE state IN ({marks}) AND kind = ? "
                               "ORDER BY created_at", (*states, kind)).fetchall()
        return [_task(r) for r in rows]

    def set_task_state(self, task_id: str, state: str, *, final_status: int | None = None,
                       final_message: str | None = None, epoch: int | None = None) -> None:
        """`epoch`: the caller's claim; a stale one changes nothing."""
        now = time.time()
        fence, args = _fence(epoch)
        self.db.execute(
            "UPDATE tasks SET state = ?, final_status = COALESCE(?, final_status), "
            "final_message = COALESCE(?, final_message), "
            "started_at = CASE WHEN ? = 'running' AND started_at IS NULL THEN ? ELSE started_at END, "
            "stopped_at = CASE WHEN ? = 'stopped' THEN ? ELSE stopped_at END "
            "WHERE id = ? AND state != 'stopped'" + fence,  # a stopped task never comes back to life
            (state, final_status, final_message, state, now, state, now, task_id, *args))

    def add_reconnect(self, task_id: str, epoch: int | None = None) -> None:
        fence, args = _fence(epoch)
        self.db.execute("UPDATE tasks SET reconnects = reconnects + 1 WHERE id = ?" + fence, (task_id, *args))

    # --- cluster: nodes, placement and task leases ---------------------------------------
    # A live task or a running job is owned by one node through a lease: the
    # owner renews it; once it runs out any node may claim the task, which
    # bumps its epoch. Every write for a task names the epoch its writer
    # claimed (append_record, set_task_state ...), and a stale one is refused:
    # a node that lost a task writes nothing more for it.

    def heartbeat(self, node: str, max_tasks: int, job_slots: int, now: float) -> None:
        self.db.execute(
            "INSERT INTO nodes (id, max_tasks, job_slots, heartbeat_at, started_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET max_tasks = excluded.max_tasks, job_slots = excluded.job_slots, "
            "heartbeat_at = excluded.heartbeat_at", (node, max_tasks, job_slots, now, now))

    # Each live node's free live-task capacity: its slots less the weights of the live tasks it owns.
    _FREE = ("SELECT n.id, n.max_tasks - CAST(COALESCE((SELECT SUM(t.weight) FROM tasks t WHERE t.node = n.id "
             "AND t.kind = 'stream' AND t.state != 'stopped'), 0) AS INTEGER) FROM nodes n WHERE n.heartbeat_at >= ?")

    @reads
    def free_capacity(self, alive_after: float) -> dict[str, int]:
        """{node: free capacity slots} of the nodes whose heartbeat is newer than `alive_after`."""
        return {node: free for node, free in self.db.execute(self._FREE, (alive_after,)).fetchall()}

    def assign_task(self, task: TaskRow, outbox: list[OutboxItem], alive_after: float) -> bool:
        """Store a task for another node to claim (`task.node`, epoch 0), with
        its events, if that node is alive and still has room for it; False
        (nothing stored) otherwise. Placements on one node are serialised."""
        with self._tx():
            self.db.execute(f"SELECT id FROM nodes WHERE id = ?{self.LOCK_ROWS}", (task.node,)).fetchall()
            free = self.db.execute(self._FREE + " AND n.id = ?", (alive_after, task.node)).fetchone()
            if free is None or free[1] < task.weight:
                return False
            self._insert_task(task)
            self._enqueue(outbox)
            return True

    def claim_tasks(self, claimant: Claimant, exclude: list[str], room: int | None,
                    limit: int = 64) -> list[tuple[TaskRow, str | None]]:
        """Live tasks this node takes now, each with a new epoch and lease:
        those it owns but does not run (`exclude`: those it runs), those
        assigned to it, and any whose lease ran out; oldest first, as many as
        fit in `room` capacity slots (None: all). Each comes with the node
        that held it before (None: nobody)."""
        with self._tx():
            mine, args = claimant.claimable()
            skip = f" AND id NOT IN ({', '.join('?' * len(exclude))})" if exclude else ""
            found = self.db.execute(
                f"SELECT id, node, weight FROM tasks WHERE kind = 'stream' AND state IN ('starting', 'running') "
                f"AND {mine}{skip} ORDER BY created_at, id LIMIT ?{self.SKIP_LOCKED}",
                (*args, *exclude, limit)).fetchall()
            taken: dict[str, str | None] = {}
            for task_id, node, weight in found:
                if room is not None:
                    if weight > room:
                        continue
                    room -= weight
                taken[task_id] = node
            if not taken:
                return []
            marks = ", ".join("?" * len(taken))
            self.db.execute(f"UPDATE tasks SET node = ?, epoch = epoch + 1, lease_until = ? WHERE id IN ({marks})",
                            (claimant.node, claimant.lease_until, *taken))
            rows = self.db.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id IN ({marks}) ORDER BY created_at, id",
                                   tuple(taken)).fetchall()
            return [(row, taken[row.id]) for row in map(_task, rows)]

    def claim_task(self, task_id: str, claimant: Claimant) -> TaskRow | None:
        """Take one live task whatever its lease (a stop asked of a node that
        does not run it: the terminal record is written under the new epoch,
        and the old owner's next write is refused). None: not live."""
        with self._tx():
            cur = self.db.execute("UPDATE tasks SET node = ?, epoch = epoch + 1, lease_until = ? "
                                  "WHERE id = ? AND state != 'stopped'", (claimant.node, claimant.lease_until, task_id))
            return self.task(task_id) if cur.rowcount else None

    def renew_leases(self, node: str, task_ids: list[str], lease_until: float) -> dict[str, int]:
        """Extend this node's leases on the tasks and jobs it runs; {id: epoch}
        of those still its own (one missing, or with another epoch, was taken over)."""
        if not task_ids:
            return {}
        marks = ", ".join("?" * len(task_ids))
        rows = self.db.execute(f"UPDATE tasks SET lease_until = ? WHERE node = ? AND id IN ({marks}) "
                               "RETURNING id, epoch", (lease_until, node, *task_ids)).fetchall()
        return {task_id: epoch for task_id, epoch in rows}

    def release_task(self, task_id: str, epoch: int) -> None:
        """Give a claimed task up at once (its lease ends now): any node may take it."""
        self.db.execute("UPDATE tasks SET lease_until = 0 WHERE id = ? AND epoch = ?", (task_id, epoch))

    # --- records ----------------------------------------------------------------

    def append_record(self, task_id: str, key_id: str, seq: int, status: int, body: bytes, *, cost: int = 0,
                      flagged: bool = False, timeline_end: float | None = None,
                      outbox: list[OutboxItem] = (),  # type: ignore[assignment]
                      final_state: tuple[int, str] | None = None, epoch: int | None = None) -> None:
        """Store one record, charge its cost to the key and queue its deliveries,
        atomically (a terminal record also closes the task: `final_state`).
        Raises InsufficientBalance or KeyRevoked (and stores nothing) when the
        key cannot pay or was revoked, LeaseLost when `epoch` is no longer the
        task's (another node took it over)."""
        with self._tx():
            self._append_record(task_id, key_id, seq, status, body, cost=cost, flagged=flagged,
                                timeline_end=timeline_end, outbox=outbox, final_state=final_state, epoch=epoch)

    def _append_record(self, task_id: str, key_id: str, seq: int, status: int, body: bytes, *, cost: int,
                       flagged: bool, timeline_end: float | None, outbox: list[OutboxItem],
                       final_state: tuple[int, str] | None, epoch: int | None = None) -> None:
        # The task's row first: it is locked from here to the commit, so a
        # takeover (which bumps the epoch on this row) is wholly before or after.
        fence, args = _fence(epoch)
        cur = self.db.execute(
            "UPDATE tasks SET next_seq = GREATEST(next_seq, ? + 1), tokens = tokens + ?, "
            "segments = segments + ?, flagged_segments = flagged_segments + ?, "
            "timeline_end = COALESCE(?, timeline_end) WHERE id = ?" + fence,
            (seq, cost, 1 if status in (0, -1) else 0, int(flagged), timeline_end, task_id, *args))
        if epoch is not None and cur.rowcount == 0:
            raise LeaseLost(task_id)
        if final_state is None and self._revoked(key_id):  # a terminal record is stored all the same
            raise KeyRevoked(key_id)
        self._charge(key_id, cost)
        self.db.execute("INSERT INTO records (task_id, seq, status, body, created_at) VALUES (?, ?, ?, ?, ?)",
                        (task_id, seq, status, body, time.time()))
        self._enqueue(outbox)
        if final_state is not None:
            self.set_task_state(task_id, "stopped", final_status=final_state[0], final_message=final_state[1])

    # --- file jobs: a kind="job" task plus its jobs row --------------------------------

    def create_job(self, task: TaskRow, input_path: str | None = None, storage: str | None = None) -> None:
        with self._tx():
            self._insert_task(task)
            self.db.execute("INSERT INTO jobs (id, status, input_path, storage) VALUES (?, 'PENDING', ?, ?)",
                            (task.id, input_path, storage))

    @reads
    def job(self, job_id: str, project_id: str | None = None) -> JobRow | None:
        sql, args = _JOB_SELECT + "WHERE t.id = ?", [job_id]
        if project_id is not None:
            sql += " AND t.project_id = ?"
            args.append(project_id)
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else _job(row)

    @reads
    def list_jobs(self, project_id: str, status: str | None, page: int,
                  page_size: int) -> tuple[list[JobRow], int]:
        rows, total = self._page(_JOB_SELECT.rstrip(), "t.project_id = ?", [project_id], ("j.status", status),
                                 "t.created_at DESC, t.id", page, page_size)
        return [_job(r) for r in rows], total

    def runnable_jobs(self, exclude: list[str], limit: int, claimant: Claimant) -> list[JobRow]:
        """The queue's head: jobs left PROCESSING by a node that is gone (its
        lease ran out, or it is this node, restarted: they run again) before
        PENDING ones, each oldest first; `exclude`: running here."""
        marks = ", ".join("?" * len(exclude))
        skip = f"AND t.id NOT IN ({marks}) " if exclude else ""
        mine, args = claimant.claimable("t")
        rows = self.db.execute(
            _JOB_SELECT + f"WHERE (j.status = 'PENDING' OR j.status = 'PROCESSING' AND {mine}) {skip}"
            "ORDER BY j.status = 'PENDING', t.created_at, t.id LIMIT ?", [*args, *exclude, limit]).fetchall()
        return [_job(r) for r in rows]

    def claim_job(self, job_id: str, events: JobEvents, claimant: Claimant) -> JobRow | None:
        """PENDING (or PROCESSING by a node that is gone, run again) -> PROCESSING
        on this node with a new lease and epoch, one more attempt; the first
        attempt also queues `events` (video.conversion.started) in the same
        transaction. None if the job is no longer runnable (cancelled, or
        another node claimed it first)."""
        with self._tx():
            mine, args = claimant.claimable()
            # The task row first: concurrent claims serialise on it, the later one sees the new lease.
            cur = self.db.execute(
                "UPDATE tasks SET node = ?, epoch = epoch + 1, lease_until = ? WHERE id = ? AND state != 'stopped' "
                f"AND ({mine} OR id IN (SELECT id FROM jobs WHERE id = ? AND status = 'PENDING'))",
                (claimant.node, claimant.lease_until, job_id, *args, job_id))
            if cur.rowcount == 0:
                return None
            cur = self.db.execute("UPDATE jobs SET status = 'PROCESSING', attempts = attempts + 1 "
                                  "WHERE id = ? AND status IN ('PENDING', 'PROCESSING')", (job_id,))
            if cur.rowcount == 0:
                return None
            self.set_task_state(job_id, "running")
            row = self.job(job_id)
            assert row is not None
            if row.attempts == 1:
                self._enqueue(events(self, row))
            return row

    def append_job_record(self, job_id: str, key_id: str, seq: int, status: int, body: bytes, *, cost: int,
                          video_tokens: int, text_tokens: int, flagged: bool, timeline_end: float | None,
                          progress: float, outbox: list[OutboxItem], epoch: int | None = None) -> None:
        """A job's segment record: stored, charged, queued for delivery and the
        job's progress and tokens moved, in one transaction (append_record's rules)."""
        with self._tx():
            self._append_record(job_id, key_id, seq, status, body, cost=cost, flagged=flagged,
                                timeline_end=timeline_end, outbox=outbox, final_state=None, epoch=epoch)
            self.db.execute("UPDATE jobs SET progress = GREATEST(progress, ?), video_tokens = video_tokens + ?, "
                            "text_tokens = text_tokens + ? WHERE id = ?",
                            (progress, video_tokens, text_tokens, job_id))

    def cancel_job(self, job_id: str, project_id: str) -> tuple[JobRow, bool] | None:
        """(the job, whether it was cancelled now): only a PENDING job is. None: no such job."""
        with self._tx():
            # The task row first, as claim_job locks it: the two never wait on each other crosswise.
            self.db.execute(f"SELECT id FROM tasks WHERE id = ?{self.LOCK_ROWS}", (job_id,)).fetchall()
            row = self.job(job_id, project_id)
            if row is None or row.status != "PENDING":
                return None if row is None else (row, False)
            self.db.execute("UPDATE jobs SET status = 'CANCELLED', completed_at = ? WHERE id = ?",
                            (time.time(), job_id))
            self.set_task_state(job_id, "stopped", final_message="cancelled")
            row = self.job(job_id)
            assert row is not None
            return row, True

    def finish_job(self, job_id: str, status: str, events: JobEvents, *, outputs: list[str] | None = None,
                   duration: float | None = None, summary: dict[str, Any] | None = None,
                   error_code: str | None = None, error_message: str | None = None,
                   epoch: int | None = None) -> JobRow | None:
        """PROCESSING -> COMPLETED or FAILED with its results, and `events`
        (video.conversion.completed/failed) queued, in one transaction. A job
        finishes once: None if it was not PROCESSING; LeaseLost if `epoch` is stale."""
        with self._tx():
            fence, args = _fence(epoch)
            if fence and self.db.execute("UPDATE tasks SET lease_until = lease_until WHERE id = ?" + fence,
                                         (job_id, *args)).rowcount == 0:
                raise LeaseLost(job_id)
            cur = self.db.execute(
                "UPDATE jobs SET status = ?, progress = CASE WHEN ? = 'COMPLETED' THEN 1.0 ELSE progress END, "
                "outputs = ?, duration = ?, summary = ?, error_code = ?, error_message = ?, completed_at = ? "
                "WHERE id = ? AND status = 'PROCESSING'",
                (status, status, None if outputs is None else json.dumps(outputs), duration,
                 None if summary is None else json.dumps(summary), error_code, error_message, time.time(), job_id))
            if cur.rowcount == 0:
                return None
            self.set_task_state(job_id, "stopped", final_message=error_message or status.lower())
            row = self.job(job_id)
            assert row is not None
            self._enqueue(events(self, row))
            return row

    # --- the delivery outbox ------------------------------------------------------

    def _enqueue(self, items: list[OutboxItem]) -> None:
        now = time.time()
        self.db.executemany(
            "INSERT INTO deliveries (id, event_id, project_id, task_id, url, stream_key, event, body, status, "
            "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            [(new_id("dlv"), i.event_id, i.project_id, i.task_id, i.url,
              f"{i.stream or i.task_id or i.event_id}|{i.url}", i.event, i.body, now, now) for i in items])

    def enqueue(self, items: list[OutboxItem]) -> None:
        with self._tx():
            self._enqueue(items)

    def due_deliveries(self, now: float, limit: int, busy_keys: set[str],
                       claim: tuple[str, float] | None = None) -> list[DeliveryRow]:
        """Pending deliveries that are due and first in line for their stream
        (task x destination): order within a stream is never broken. With
        `claim` (token, until: several nodes send from one outbox) each row
        returned is claimed until then, and rows another sender claims are
        skipped: one sender per stream across the cluster."""
        if claim is None:
            return self._due(now, limit, busy_keys, "", "")
        with self._tx():
            due = self._due(now, limit, busy_keys, " AND (claimed_until IS NULL OR claimed_until < ?)",
                            self.SKIP_LOCKED, now)
            if due:
                self.db.execute(f"UPDATE deliveries SET claimed_by = ?, claimed_until = ? "
                                f"WHERE n IN ({', '.join('?' * len(due))})", (*claim, *(r.n for r in due)))
            return due

    def _due(self, now: float, limit: int, busy_keys: set[str], free: str, lock: str,
             *args: Any) -> list[DeliveryRow]:
        rows = self.db.execute(
            f"SELECT {_DELIVERY_COLS} FROM deliveries d WHERE status = 'pending' AND next_attempt_at <= ?{free} "
            "AND n = (SELECT MIN(n) FROM deliveries e WHERE e.stream_key = d.stream_key AND e.status = 'pending') "
            f"ORDER BY next_attempt_at, n LIMIT ?{lock}", (now, *args, limit + len(busy_keys))).fetchall()
        out = [DeliveryRow(*r) for r in rows]
        return [r for r in out if r.stream_key not in busy_keys][:limit]

    def release_claims(self, prefix: str) -> None:
        """At start: deliveries a previous process of this node had claimed go out again at once."""
        self.db.execute("UPDATE deliveries SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by LIKE ?",
                        (prefix + "%",))

    def next_due(self) -> float | None:
        row = self.db.execute("SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'").fetchone()
        return row[0]

    def delivery_done(self, delivery_id: str, status_code: int, claim: str | None = None) -> None:
        """`claim`: the sender's token; a claim that ran out and was taken by another sender changes nothing."""
        fence, args = _claimed(claim)
        self.db.execute("UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = ?, "
                        "last_status_code = ?, last_error = NULL, claimed_by = NULL, claimed_until = NULL "
                        "WHERE id = ?" + fence, (time.time(), status_code, delivery_id, *args))

    def delivery_failed_attempt(self, delivery_id: str, error: str, status_code: int | None,
                                next_attempt_at: float | None, claim: str | None = None) -> None:
        """Count a failed attempt; None for next_attempt_at means give up (failed)."""
        fence, args = _claimed(claim)
        self.db.execute(
            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, last_status_code = ?, "
            "status = CASE WHEN ? IS NULL THEN 'failed' ELSE 'pending' END, "
            "next_attempt_at = COALESCE(?, next_attempt_at), claimed_by = NULL, claimed_until = NULL "
            "WHERE id = ?" + fence,
            (error, status_code, next_attempt_at, next_attempt_at, delivery_id, *args))

    @reads
    def deliveries(self, project_id: str, status: str | None, page: int,
                   page_size: int) -> tuple[list[DeliveryRow], int]:
        rows, total = self._page(f"SELECT {_DELIVERY_COLS} FROM deliveries", "project_id = ?", [project_id],
                                 ("status", status), "n DESC", page, page_size)
        return [DeliveryRow(*r) for r in rows], total

    @reads
    def delivery(self, delivery_id: str, project_id: str) -> DeliveryRow | None:
        row = self.db.execute(f"SELECT {_DELIVERY_COLS} FROM deliveries WHERE id = ? AND project_id = ?",
                              (delivery_id, project_id)).fetchone()
        return None if row is None else DeliveryRow(*row)

    def retry_delivery(self, delivery_id: str, project_id: str) -> DeliveryRow | None:
        """Send a delivery again from now, with a fresh set of attempts."""
        self.db.execute("UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?, "
                        "delivered_at = NULL WHERE id = ? AND project_id = ?", (time.time(), delivery_id,
                                                                                project_id))
        return self.delivery(delivery_id, project_id)

    def outbox_stats(self) -> tuple[int, float | None]:
        """Pending deliveries and the creation time of the oldest."""
        return self.db.execute("SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE status = 'pending'").fetchone()

    # --- frame-level alerts ------------------------------------------------------------

    def add_alerts(self, task_id: str, project_id: str, alerts: list[tuple[str, str, float, bytes]],
                   outbox: list[OutboxItem], epoch: int | None = None) -> None:
        """Alerts (event_id, category, timeline seconds, data) and their
        deliveries in one transaction; LeaseLost (nothing written) when
        `epoch` is stale, like a record: a node that lost the task sends no
        alert for it."""
        now = time.time()
        with self._tx():
            if epoch is not None:  # the task's row locked and checked first, as for a record
                fence, args = _fence(epoch)
                if self.db.execute("UPDATE tasks SET epoch = epoch WHERE id = ?" + fence,
                                   (task_id, *args)).rowcount == 0:
                    raise LeaseLost(task_id)
            self.db.executemany(
                "INSERT INTO alerts (task_id, project_id, event_id, category, time, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(task_id, project_id, event_id, category, t, body, now) for event_id, category, t, body in alerts])
            self._enqueue(outbox)

    @reads
    def alerts(self, project_id: str, task_id: str | None, after: int,
               limit: int) -> list[tuple[int, str, bytes, float]]:
        """(alert_index, event_id, data, created_at) after `after`, oldest first."""
        where, args = "project_id = ? AND n > ?", [project_id, after]
        if task_id is not None:
            where, args = where + " AND task_id = ?", [*args, task_id]
        return self.db.execute(f"SELECT n, event_id, body, created_at FROM alerts WHERE {where} ORDER BY n LIMIT ?",
                               [*args, limit]).fetchall()

    @reads
    def last_alert_times(self, task_id: str) -> dict[str, float]:
        """Per category, the timeline time of the task's latest alert (a resumed
        task keeps its cooldowns)."""
        return dict(self.db.execute("SELECT category, MAX(time) FROM alerts WHERE task_id = ? GROUP BY category",
                                    (task_id,)).fetchall())

    @reads
    def records(self, task_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT seq, body FROM records WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                               (task_id, after, limit)).fetchall()

    def purge(self, older_than: float) -> int:
        """Retention: records, and settled deliveries, older than the cut-off.
        Pending deliveries are kept whatever their age."""
        with self._tx():
            n = self.db.execute("DELETE FROM records WHERE created_at < ?", (older_than,)).rowcount
            self.db.execute("DELETE FROM alerts WHERE created_at < ?", (older_than,))
            self.db.execute("DELETE FROM deliveries WHERE created_at < ? AND status != 'pending'", (older_than,))
        return n


class _Transaction:
    """`begin`: SQLite takes the write lock at once (IMMEDIATE); PostgreSQL locks rows as it goes."""

    def __init__(self, db: Any, begin: str = "BEGIN IMMEDIATE") -> None:
        self.db = db
        self.begin = begin

    def __enter__(self) -> None:
        self.db.execute(self.begin)

    def __exit__(self, exc_type, *_: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class AsyncStore:
    """Runs every Store call on the store's own thread; `@reads` methods on a
    reader connection with its own thread."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._reader: Store | None = None
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-read")

    def _open_reader(self) -> Store:
        if self._reader is None:
            self._reader = Store(self.sync.path)
        return self._reader

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        if getattr(fn, "__streamguard_reads__", False):
            return await loop.run_in_executor(self._read_pool, lambda: fn(self._open_reader(), *args, **kwargs))
        return await loop.run_in_executor(self._pool, lambda: fn(self.sync, *args, **kwargs))

    def close(self) -> None:
        self._read_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
        self.sync.close()

    async def aclose(self) -> None:
        """PgAsyncStore's interface: both close the same way from the runtime."""
        self.close()
