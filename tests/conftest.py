"""Shared fixtures: the generated test model bundle and test videos, and a
runner for the real `streamguard` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from videos import make_video  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "live: needs real RTMP/RTSP/HLS servers on loopback")


@pytest.fixture(autouse=True)
def _live_tools(request: pytest.FixtureRequest) -> None:
    """Live tests need real servers; without them they fail (never skip), saying how to get them."""
    if request.node.get_closest_marker("live") is None:
        return
    from live_servers import missing_tools
    missing = missing_tools("ffmpeg", "rtmp", "rtsp")
    if missing:
        pytest.fail(f"live test tools missing ({missing}): run `bash .ci/system-deps.sh`", pytrace=False)


@pytest.fixture(scope="module")
def rtmp():
    """A real nginx-rtmp server on loopback, one per test module."""
    from live_servers import RtmpServer
    with RtmpServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamguard.inference.testmodel import make_test_bundle

    path = tmp_path_factory.mktemp("bundle")
    make_test_bundle(path)
    return path


@pytest.fixture(scope="session")
def red_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 s, 25 fps, 2 s GOP, saturated red during seconds 10-15, with audio."""
    return make_video(tmp_path_factory.mktemp("videos") / "red.mp4", seconds=30, red=((10, 15),))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def run_cli(*args: str | os.PathLike, timeout: float = 120, env: dict | None = None) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "streamguard", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL (Debian's postgresql-15) on loopback, for the whole session."""
    from pg_server import PostgresServer, missing
    problem = missing()
    if problem:
        pytest.fail(f"PostgreSQL missing: {problem}", pytrace=False)
    with PostgresServer() as srv:
        yield srv


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path):
    """Opens stores on one database, SQLite or a fresh PostgreSQL database:
    `store_backend()` is a new connection each call (like another process)."""
    from streamguard.store import Store
    if request.param == "sqlite":
        def open_sqlite() -> Store:
            return Store(tmp_path / "sg.db")
        open_sqlite.kind = "sqlite"  # type: ignore[attr-defined]
        return open_sqlite
    from streamguard.store.postgres import PgStore
    url = request.getfixturevalue("postgres").new_database()

    def open_pg() -> Store:
        return PgStore(url)
    open_pg.kind = "postgres"  # type: ignore[attr-defined]
    open_pg.url = url  # type: ignore[attr-defined]
    return open_pg
