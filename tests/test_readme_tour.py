"""The README's 60-second tour, run as written (issue 8, item 11): the ```sh block
under "## 60-second tour" is read from README.md and its commands are run
against a real daemon (tests/daemon.py) and the README's own ffmpeg RTMP
source, in a fresh directory laid out as after the set-up command (`./var`
holding the model). Only what must differ on a test machine is substituted:
free ports for 8080 and 1935, `python -m streamguard` for `.venv/bin/streamguard`,
and a small frame size for the live source (the tests share two cores).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import Daemon, free_port

pytestmark = [pytest.mark.live]

REPO = Path(__file__).resolve().parents[1]
CLI = ".venv/bin/streamguard"


def tour_block() -> str:
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("## 60-second tour"):]
    match = re.search(r"```sh\n(.*?)```", tour, re.S)
    assert match, "the tour has a ```sh block"
    return match.group(1)


def terminals(block: str) -> dict[int, str]:
    """The block's sections, keyed by their `# terminal N:` heading."""
    parts = re.split(r"^# terminal (\d+):.*$", block, flags=re.M)
    return {int(n): text.strip() for n, text in zip(parts[1::2], parts[2::2])}


def commands(section: str) -> list[str]:
    """Shell commands of a section: comments dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", section)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Localize:
    def __init__(self, api_port: int, rtmp_port: int) -> None:
        self.api_port, self.rtmp_port = api_port, rtmp_port

    def __call__(self, cmd: str) -> str:
        cmd = cmd.replace(CLI, f"{shlex.quote(sys.executable)} -m streamguard")
        cmd = cmd.replace("localhost:8080", f"127.0.0.1:{self.api_port}")
        return cmd.replace("127.0.0.1:1935", f"127.0.0.1:{self.rtmp_port}")


def start_source(cmd: str, cwd: Path, log: Path) -> subprocess.Popen:
    cmd = re.sub(r"size=\d+x\d+", "size=320x180", cmd)
    return subprocess.Popen(shlex.split(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"), start_new_session=True)


def stop_source(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    proc.wait(timeout=10)


def test_tour_commands_are_copy_pasteable() -> None:
    """After the set-up command nothing is on PATH but what the venv has: every
    streamguard call uses the venv's path; the daemon may read loopback sources."""
    block = tour_block()
    sections = terminals(block)
    assert sorted(sections) == [1, 2, 3]
    assert not re.search(r"(^|[\s$(])streamguard ", block, re.M), "bare `streamguard` is not on PATH after set-up"
    assert not re.search(r"tsk_\.\.\.", "\n".join(commands(block))), "placeholders cannot be pasted"
    (serve,) = commands(sections[2])
    assert serve == f"STREAMGUARD_SOURCES__ALLOW_PRIVATE=true {CLI} serve"
    (source,) = commands(sections[1])
    assert "-listen 1" in source and "rtmp://127.0.0.1:1935/live/cam1" in source
    assert "rtmp://127.0.0.1:1935/live/cam1" in sections[3]


def test_tour_runs_against_a_real_daemon_and_source(test_bundle: Path, tmp_path: Path) -> None:
    sections = terminals(tour_block())
    home = tmp_path / "checkout"
    model = home / "var" / "models" / "default"  # where the set-up command puts it
    model.parent.mkdir(parents=True)
    model.symlink_to(test_bundle)
    rtmp_port = free_port()
    (source_cmd,) = commands(sections[1])
    with Daemon(home / "var", model) as daemon:
        local = Localize(daemon.port, rtmp_port)
        script = [local(c) for c in commands(sections[3])]
        multi = next(i for i, c in enumerate(script) if re.search(r"scan \S+ rtmp://", c))
        source = start_source(local(source_cmd), home, tmp_path / "source.log")
        try:
            first = subprocess.run(["bash", "-c", "\n".join(script[:multi])], cwd=home, capture_output=True,
                                   text=True, timeout=150)
        finally:
            stop_source(source)
        log = f"stdout:\n{first.stdout[-3000:]}\nstderr:\n{first.stderr[-3000:]}\n{daemon.logs()}"
        store = (home / "var" / "streamguard.db").resolve()
        assert f"keys store {store}" in first.stderr, log  # the key went to the daemon's store

        task = json.loads((home / "start.json").read_text())["data"]["task_id"]
        assert task.startswith("tsk_"), log
        assert '"state":"running"' in first.stdout, log
        assert "#EXT-X-STREAM-INF" in first.stdout, log  # the live master playlist
        assert "streamguard_" in first.stdout and '"openapi"' in first.stdout, log
        # What the tour's curls showed, read back through the API with another key of the project.
        key = daemon.create_key("demo")
        view = daemon.wait_stopped(task, key, timeout=20)
        assert view["status"] == 14, view
        records = daemon.records(task, key)
        moderated = [r for r in records if r["data"]["status"] == 0]
        assert moderated and all(r["data"]["data"]["content_moderation"] for r in moderated), log
        assert records[-1]["data"]["status"] == 14

        # The one-shot scan of the file the tour made.
        playlist = (home / "hls" / "source" / "playlist.m3u8").read_text()
        assert playlist.rstrip().endswith("#EXT-X-ENDLIST") and (home / "hls" / "master.m3u8").exists()

        # Several inputs: the source again (the tour says to restart it), ended by SIGINT after 12 s.
        source = start_source(local(source_cmd), home, tmp_path / "source.log")
        try:
            second = subprocess.run(["bash", "-c", script[multi]], cwd=home, capture_output=True, text=True,
                                    timeout=60)
        finally:
            stop_source(source)
        assert second.returncode == 130, second.stderr  # the scan's own status, through timeout
        assert "Traceback" not in second.stderr, second.stderr
        listing = subprocess.run(["bash", "-c", "\n".join(script[multi + 1:])], cwd=home, capture_output=True,
                                 text=True, timeout=30)
        assert listing.returncode == 0 and listing.stdout.count("master.m3u8") == 2, listing
        folders = sorted(p.parent.name for p in (home / "multi").glob("*/master.m3u8"))
        assert [re.sub(r"-[0-9a-f]{8}$", "", f) for f in folders] == ["cam1", "talk"], (folders, second.stderr)
        for folder in folders:
            text = (home / "multi" / folder / "source" / "playlist.m3u8").read_text()
            assert text.rstrip().endswith("#EXT-X-ENDLIST"), (folder, text)
        assert second.stdout.count('"task_id":"cam1-') >= 1, second.stderr
