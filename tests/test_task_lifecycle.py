"""Task lifecycle under faults and at the edges of capacity (issue 8 items 5, 6, 7, 13),
against a real `streamguard serve` daemon (tests/daemon.py) and real nginx-rtmp +
ffmpeg publishers (tests/live_servers.py).

- A task's media dir replaced by a file (a real write failure, root or not): the
  pipeline restarts, each failure counted by reason; then the task ends with 16
  naming the cause, never with -1; its slot, its ingest thread and its entry go.
- The store locked by another process (`database is locked`): the segment that could
  not be stored is cut again after the restart, so records still tile; 16 at the
  end; GET answers all along.
- A start whose media dir cannot be made stores nothing (no ghost task).
- 50 concurrent starts against max_tasks = 10 admit exactly 10; a failed start frees
  its slot; tasks resumed after a crash hold slots.
- `streamguard keys revoke` (another process) ends the key's running task with 14.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402
from daemon import Daemon  # noqa: E402

pytestmark = [pytest.mark.live, pytest.mark.timeout(150)]

SEG = 2
ENV = {
    "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "60",
    "STREAMGUARD_LIVE__READ_TIMEOUT": "2",
    "STREAMGUARD_LIVE__OPEN_TIMEOUT": "5",
    "STREAMGUARD_LIVE__MAX_FAILURES": "3",
    "STREAMGUARD_LIVE__FAILURE_WINDOW": "120",
}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ls.make_test_video(tmp_path_factory.mktemp("lifecycle-video") / "v.mp4", seconds=10, fps=25,
                              width=160, height=120, red_ranges=())


@pytest.fixture
def publisher(video: Path, rtmp: ls.RtmpServer, request: pytest.FixtureRequest):
    with ls.publishing(video, rtmp, request.node.name) as (_, url):
        yield url


def start(d: Daemon, key: str, url: str, **params):
    return d.call("POST", "/v1/streams", {"url": url, "enable_content_moderation": True,
                                          "segment_seconds": SEG, **params}, key=key)


def start_ok(d: Daemon, key: str, url: str) -> str:
    reply = start(d, key, url)
    assert reply.status == 200, reply.body
    return reply.body["data"]["task_id"]


def metric(d: Daemon, name: str, labels: str = "") -> float:
    text = d.call("GET", "/metrics").body.decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def statuses(records: list[dict]) -> list[int]:
    return [r["data"]["status"] for r in records]


def assert_tiles(records: list[dict]) -> None:
    datas = [r["data"]["data"] for r in records]
    assert [x["segment_index"] for x in datas] == list(range(len(datas))), datas
    assert datas[0]["start_time"] == "0.000"
    for a, b in zip(datas, datas[1:]):
        assert a["end_time"] == b["start_time"], (a, b)


def assert_ended_cleanly(d: Daemon, key: str, task_id: str, status: int) -> list[dict]:
    """Terminal record last, only 0 before it, counters count stored segments, nothing left running."""
    view = d.call("GET", f"/v1/streams/{task_id}", key=key).data
    records = d.records(task_id, key)
    assert statuses(records)[-1] == status and set(statuses(records)[:-1]) <= {0}, statuses(records)
    assert records[-1]["data"]["data"] is None and records[-1]["data"]["token"] is None
    assert view["counters"]["segments"] == len(records) - 1, (view, statuses(records))
    d.wait_for(lambda: metric(d, "streamguard_ingest_threads") == 0, 10, "the ingest thread to end")
    assert metric(d, "streamguard_active_tasks") == 0
    return records


# --------------------------------------------------------------------------- item 5: failures


def test_media_dir_gone_restarts_then_ends_with_16_and_frees_everything(tmp_path: Path, test_bundle: Path,
                                                                        publisher: str) -> None:
    with Daemon(tmp_path / "data", test_bundle, {**ENV, "STREAMGUARD_LIMITS__MAX_TASKS": "1"}) as d:
        key = d.create_key("faults-media")
        task_id = start_ok(d, key, publisher)
        d.wait_for(lambda: len(d.records(task_id, key)) >= 2, 30, "two records")
        media = d.data_dir / "media" / task_id
        shutil.rmtree(media)
        media.write_text("not a directory")  # every write under it now fails, for root too

        view = d.wait_stopped(task_id, key, timeout=40)
        assert view["status"] == 16, view
        assert view["message"].startswith("task failed 3 times within 120 s; last: cannot write media"), view
        records = assert_ended_cleanly(d, key, task_id, 16)
        assert records[-1]["data"]["message"] == view["message"]
        assert_tiles(records[:-1])
        assert metric(d, "streamguard_task_failures_total", '{reason="media"}') == 3
        assert "restarting its pipeline" in d.logs()

        # GET and stop keep answering for the ended task; its slot is free (max_tasks = 1)
        stop = d.call("POST", f"/v1/streams/{task_id}/stop", key=key)
        assert stop.status == 200 and stop.data["status"] == 16, stop.body
        media.unlink()
        second = start_ok(d, key, publisher)
        d.wait_for(lambda: len(d.records(second, key)) >= 1, 30, "a record of the next task")
        stop = d.call("POST", f"/v1/streams/{second}/stop", key=key)
        assert stop.status == 200 and stop.data["status"] == 14, stop.body
        assert_ended_cleanly(d, key, second, 14)


def test_store_locked_by_another_process_restarts_from_the_last_stored_segment(
        tmp_path: Path, test_bundle: Path, publisher: str) -> None:
    env = {**ENV, "STREAMGUARD_LIVE__MAX_FAILURES": "2"}
    with Daemon(tmp_path / "data", test_bundle, env) as d:
        key = d.create_key("faults-store")
        task_id = start_ok(d, key, publisher)
        d.wait_for(lambda: len(d.records(task_id, key)) >= 2, 30, "two records")
        lock = sqlite3.connect(d.data_dir / "streamguard.db", isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")  # held by this process: the daemon's writes get `database is locked`
        try:
            def ended() -> dict | None:
                t0 = time.monotonic()
                reply = d.call("GET", f"/v1/streams/{task_id}", key=key, timeout=10)
                assert reply.status == 200 and time.monotonic() - t0 < 3, "GET must answer while writes wait"
                return reply.data if reply.data["state"] == "stopped" else None

            view = d.wait_for(ended, 60, "the task to end while the store is locked")
            assert view["status"] == 16, view
            assert "store error: database is locked" in view["message"], view
            assert metric(d, "streamguard_task_failures_total", '{reason="store"}') >= 2
            assert metric(d, "streamguard_active_tasks") == 0
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        # the terminal record was kept and is stored once the store takes writes again
        d.wait_for(lambda: statuses(d.records(task_id, key))[-1] == 16, 40, "the terminal record to be stored")
        records = assert_ended_cleanly(d, key, task_id, 16)
        assert_tiles(records[:-1])  # lost segments were cut again: no gap in the timeline


def test_start_that_cannot_make_its_media_dir_stores_nothing(tmp_path: Path, test_bundle: Path,
                                                             publisher: str) -> None:
    data = tmp_path / "data"
    with Daemon(data, test_bundle, {**ENV, "STREAMGUARD_LIMITS__MAX_TASKS": "1"}) as d:
        key = d.create_key("faults-start")
        media = data / "media"
        shutil.rmtree(media, ignore_errors=True)
        media.write_text("not a directory")
        reply = start(d, key, publisher)
        assert reply.status == 503 and "cannot write media" in reply.error["message"], reply.body
        listing = d.call("GET", "/v1/streams", key=key).data
        assert listing["total"] == 0, listing  # no ghost task
        media.unlink()
        task_id = start_ok(d, key, publisher)  # the failed start gave its slot back
        d.kill()
    # A restart resumes only the real task; one whose media dir is broken by then ends
    # with 16 naming why, instead of running without media or holding the daemon up.
    task_dir = data / "media" / task_id
    shutil.rmtree(task_dir)
    task_dir.write_text("not a directory")
    with Daemon(data, test_bundle, ENV) as d2:
        listing = d2.call("GET", "/v1/streams", key=key).data
        assert [t["task_id"] for t in listing["items"]] == [task_id], listing
        view = d2.wait_stopped(task_id, key, timeout=10)
        assert view["status"] == 16 and view["message"].startswith("cannot resume: cannot write media"), view
        assert statuses(d2.records(task_id, key)) == [16]
        assert metric(d2, "streamguard_task_failures_total", '{reason="media"}') == 1


# --------------------------------------------------------------------------- item 6: admission


def test_concurrent_starts_admit_exactly_max_tasks_and_resumed_tasks_hold_slots(tmp_path: Path,
                                                                                test_bundle: Path) -> None:
    data = tmp_path / "data"
    env = {**ENV, "STREAMGUARD_LIMITS__MAX_TASKS": "10"}
    url = f"rtmp://127.0.0.1:{ls.closed_port()}/live/nobody"  # tasks keep retrying within no_data_timeout
    with Daemon(data, test_bundle, env) as d:
        key = d.create_key("admission")
        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(lambda _: start(d, key, url), range(50)))
        codes = sorted(r.status for r in replies)
        assert codes.count(200) == 10 and codes.count(429) == 40, codes
        assert {r.error["code"] for r in replies if r.status == 429} == {"STREAMGUARD_CAPACITY_REACHED"}
        admitted = [r.body["data"]["task_id"] for r in replies if r.status == 200]
        assert d.call("GET", "/v1/streams?pageSize=100", key=key).data["total"] == 10

        # a start that fails after taking its slot gives it back
        assert d.call("POST", f"/v1/streams/{admitted.pop()}/stop", key=key).status == 200
        bad = start(d, key, url, callback_url="http://127.0.0.1:9/cb")  # private callback: refused
        assert bad.status in (400, 422), bad.body
        admitted.append(start_ok(d, key, url))
        assert start(d, key, url).status == 429
        d.kill()  # a crash: the ten tasks are resumed by the next process

    with Daemon(data, test_bundle, env) as d2:
        assert metric(d2, "streamguard_active_tasks") == 10
        full = start(d2, key, url)
        assert full.status == 429 and full.error["code"] == "STREAMGUARD_CAPACITY_REACHED", full.body
        for t in admitted:
            assert d2.call("POST", f"/v1/streams/{t}/stop", key=key).data["status"] == 14
        start_ok(d2, key, url)


def test_revoked_key_ends_its_tasks_with_14(tmp_path: Path, test_bundle: Path, publisher: str) -> None:
    with Daemon(tmp_path / "data", test_bundle, ENV) as d:
        key = d.create_key("revocation")
        reader = d.create_key("revocation")  # same project: still allowed to look
        task_id = start_ok(d, key, publisher)
        d.wait_for(lambda: len(d.records(task_id, key)) >= 1, 30, "a record")
        res = d.cli("keys", "revoke", key)  # another process, the same SQLite file
        assert res.returncode == 0, res.stderr
        t0 = time.monotonic()
        view = d.wait_stopped(task_id, reader, timeout=15)
        took = time.monotonic() - t0
        assert view["status"] == 14 and view["message"] == "API key revoked", view
        assert took <= 2.0 + SEG + 2, f"revocation noticed after {took:.1f} s"
        records = assert_ended_cleanly(d, reader, task_id, 14)
        assert records[-1]["data"]["message"] == "API key revoked"
        assert d.call("GET", f"/v1/streams/{task_id}", key=key).status == 401
