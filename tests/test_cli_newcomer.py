"""What a newcomer meets first (issue 8, item 11): `--version`, which store the
`keys` commands use, an offline `models pull`, and the CI set-up installing
everything the tests use."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import sys
from pathlib import Path

import streamguard

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | os.PathLike, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH keeps this checkout's package first when the test runs from elsewhere.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "streamguard", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": path, **(env or {})})


def test_version(tmp_path: Path) -> None:
    res = run("--version", cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.strip() == f"streamguard {streamguard.__version__}"


def test_keys_commands_name_the_store_they_use(tmp_path: Path) -> None:
    """./var depends on the working directory: each keys command says (on stderr)
    which store it used, as an absolute path, and keeps stdout for its result."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    store = (here / "var" / "streamguard.db").resolve()

    created = run("keys", "create", "--project", "demo", "--balance", "100", cwd=here)
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert key.startswith("sg_")
    assert f"keys store {store} (new;" in created.stderr
    assert store.exists()

    again = run("keys", "balance", key, cwd=here)
    assert again.returncode == 0 and again.stdout.strip() == "100"
    assert again.stderr.strip() == f"streamguard: keys store {store}"

    # Run elsewhere, the same key is not found, and the message says where it looked.
    lost = run("keys", "balance", key, cwd=elsewhere)
    assert lost.returncode == 1
    other = (elsewhere / "var" / "streamguard.db").resolve()
    assert f"no store at {other}" in lost.stderr and "--data-dir" in lost.stderr
    assert not other.exists(), "a lookup must not create an empty store"

    # --data-dir reaches the first store from anywhere; a relative one is made absolute.
    found = run("keys", "revoke", key, "--data-dir", "../here/var", cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    assert f"keys store {store}" in found.stderr


def test_models_pull_offline_points_at_make_test_and_the_mirror(tmp_path: Path) -> None:
    with socket.socket() as sock:  # free a moment ago: nothing listens there (no route to a hub)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = run("models", "pull", "clip-vit-b32", "--dest", tmp_path / "m", cwd=tmp_path,
              env={"STREAMGUARD_MODEL_HUB_URL": f"http://127.0.0.1:{port}/"})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamguard: error: cannot reach"), res.stderr
    for hint in ("streamguard models make-test", "--base-url", "STREAMGUARD_MODEL_HUB_URL", "--model DIR"):
        assert hint in lines[0]
    assert "Traceback" not in res.stderr


def test_system_deps_installs_npm_when_none_runs() -> None:
    """hls.js comes from npm: on a machine without npm, .ci/system-deps.sh installs Node.js and npm."""
    script = REPO / ".ci" / "system-deps.sh"
    env = {**os.environ, "SYSTEM_DEPS_DRY_RUN": "1", "NPM": "/nonexistent/npm"}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert re.search(r"would install: .*\bnodejs npm\b", res.stdout), res.stdout
    assert "bash .ci/system-deps.sh" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^  curl\b", script.read_text(), re.M), "the README tour (and its test) use curl"


def test_readme_links_nothing_outside_the_repo() -> None:
    readme = (REPO / "README.md").read_text()
    assert not re.search(r"(^|[\s`(\[])\.\./", readme), "a path outside the repository"
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        if target.startswith("#"):  # a section of the README itself
            assert target[1:] in _anchors(readme), target
            continue
        assert target.startswith(("http://", "https://")) or (REPO / target).exists(), target


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    headings = re.findall(r"^#+ (.*)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_serve_logs_its_absolute_data_dir(test_bundle: Path, tmp_path: Path) -> None:
    import signal

    from daemon import free_port, request

    port = free_port()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "streamguard", "serve", "--port", str(port), "--data-dir", "var",
                             "--model", str(test_bundle)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if request(f"http://127.0.0.1:{port}", "GET", "/healthz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"(data {(tmp_path / 'var').resolve()})" in err, err
