"""Schema fuzzing: Schemathesis drives every operation of the daemon's own
/openapi.json (valid and invalid inputs, with a key) against a real daemon that
runs a real live task (nginx-rtmp + an ffmpeg publisher), so task and delivery
routes see real ids. It must find no unhandled error (500, in the daemon's log) and no reply that breaks the document
(status, content type, response schema). Bounded: a few examples per operation
and a time budget, well under two minutes on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import live_servers as ls
from daemon import Daemon
from receivers import Receiver

pytestmark = [pytest.mark.live, pytest.mark.timeout(240)]

MAX_EXAMPLES = 25  # per operation in the examples and coverage phases
MAX_TIME = 45  # seconds: fuzzing repeats until the budget is spent
# Schema-valid requests may still be refused by design (a preset rendition is 422 until
# presets exist; 5.0 is an integer to JSON Schema but not to msgspec), so
# positive_data_acceptance is not among them. FUZZ_CHECKS=all shows everything.
# not_a_server_error is left to the daemon's log (below): every unhandled error
# on any route is logged there, while 502 STREAMGUARD_INPUT_UNREACHABLE (a
# generated inputUrl whose host does not resolve) is the contract's answer,
# which that check would count as a server error.
CHECKS = os.environ.get("FUZZ_CHECKS", "status_code_conformance,content_type_conformance,"
                        "response_schema_conformance,response_headers_conformance,negative_data_rejection")


def _config(task_id: str, delivery_id: str) -> str:
    """Real ids for the path parameters about half of the time; random ones otherwise."""
    return f"""
[dictionaries.task_ids]
values = [{json.dumps(task_id)}]
[dictionaries.delivery_ids]
values = [{json.dumps(delivery_id)}]
[parameters]
"path.task_id" = {{ dictionary = "task_ids", probability = 0.5 }}
"path.delivery_id" = {{ dictionary = "delivery_ids", probability = 0.5 }}

"""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(test_bundle: Path, tmp_path: Path, rtmp):
    video = ls.make_test_video(tmp_path / "v.mp4", seconds=6, fps=25, width=160, height=120, gop=25)
    env = {"STREAMGUARD_LIMITS__MAX_TASKS": "3", "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "5",
           "STREAMGUARD_LIVE__OPEN_TIMEOUT": "2", "STREAMGUARD_LIVE__READ_TIMEOUT": "2",
           "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true", "STREAMGUARD_DELIVERY__TIMEOUT": "2"}
    with Receiver() as hook, Daemon(tmp_path / "daemon", test_bundle, env) as d, \
            ls.Publisher(video, rtmp.url("fuzz")):
        key = d.create_key("fuzz")
        assert d.call("PUT", "/v1/project/webhook", {"url": hook.url("/hook"), "events": []}, key=key).status == 200
        started = d.call("POST", "/v1/streams", {"url": rtmp.url("fuzz"), "segment_seconds": 1,
                                                 "enable_content_moderation": True}, key=key)
        assert started.status == 200, started.body
        task_id = started.data["task_id"]
        d.wait_for(lambda: d.records(task_id, key), 30, "a first record")
        deliveries = d.call("GET", "/v1/deliveries", key=key).data["items"]
        assert deliveries, "the task's events made no delivery"
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(task_id, deliveries[0]["id"]))
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"{d.base}/openapi.json", "--header", f"Authorization: Bearer {key}", "--checks", CHECKS,
               "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_TIME), "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--request-timeout", "20", "--seed", "1",
               "--generation-database", "none", "--no-color"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_TIME + 90,
                             cwd=tmp_path)
        report = run.stdout[-12000:] + run.stderr[-3000:]
        assert run.returncode == 0, f"schemathesis found problems:\n{report}\n--- daemon log ---\n{d.logs()}"
        assert "unhandled error" not in d.logs() and "internal error" not in d.logs(), d.logs()
        # the live task lived through the fuzzing (or was stopped by it): either way its state is readable
        assert d.call("GET", f"/v1/streams/{task_id}", key=key).status == 200
