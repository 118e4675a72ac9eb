"""A real PostgreSQL server for tests: Debian's postgresql-15 (initdb +
postgres), run as a non-root user, data in a temp dir, listening on a free
127.0.0.1 port (and a unix socket in its temp dir). Each test gets a fresh
database of its own (`new_database`)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("STREAMGUARD_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "sgpgtest"  # the OS user the server runs as when tests run as root (postgres refuses root)


def missing() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return f"{PG_BIN}/initdb (Debian package postgresql-15: run `bash .ci/system-deps.sh`)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: a dedicated unprivileged user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sg-pg-"))  # not under pytest's 0700 tmp: the server user reads it
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.ids = _run_as()

    def _popen_kwargs(self) -> dict:
        return {} if self.ids is None else {"user": self.ids[0], "group": self.ids[1], "extra_groups": []}

    def __enter__(self) -> "PostgresServer":
        data = self.root / "data"
        if self.ids is not None:
            os.chown(self.root, *self.ids)
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, cwd=self.root,
                       **self._popen_kwargs())
        self.log = open(self.root / "postgres.log", "wb")
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root, **self._popen_kwargs())
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                import psycopg
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start:\n"
                                       + (self.root / "postgres.log").read_text(errors="replace")[-3000:])
                time.sleep(0.1)
        return self

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: connected clients do not hold it up
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
