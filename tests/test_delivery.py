"""Webhook and callback delivery end to end (CONTRACT §3 and §4).

A real `streamguard serve` daemon (tests/daemon.py) reads a real RTMP stream
(nginx-rtmp + an ffmpeg publisher, tests/live_servers.py) and delivers its
records and events to real HTTP receivers on loopback (tests/receivers.py).
Each receiver records every request and can be switched to answer 500, to
answer too late, to redirect, or to go away (connections refused) and come back
on the same port.

Covered: the normal flow (stream.started, stream.segment in segment order, the
terminal 14, stream.stopped; Standard Webhooks signatures; a project webhook
subscribed to one event); a receiver that is down, then failing, then slow and
then recovers gets everything in order; a dead receiver does not hold up
another task; SIGKILL of the daemon mid-stream and a restart lose nothing; retries
exhausted -> failed, then a manual retry; private/loopback/link-local callback
URLs refused by default without any connection; secret rotation signs with
both secrets; redirects are not followed.

Short delivery timeout and backoff come from STREAMGUARD_DELIVERY__* overrides;
every wait is bounded.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls
from daemon import Daemon
from receivers import Receiver, Request

pytestmark = [pytest.mark.timeout(120)]

DELIVERY_TIMEOUT = 1.0
SLOW = DELIVERY_TIMEOUT + 1.5  # a "slow" receiver answers after this
ENV_BASE = {
    "STREAMGUARD_DELIVERY__TIMEOUT": str(DELIVERY_TIMEOUT),
    "STREAMGUARD_DELIVERY__RETRY_BASE_SECONDS": "0.2",
    "STREAMGUARD_DELIVERY__RETRY_MAX_SECONDS": "1",
    "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "8",
    "STREAMGUARD_LIVE__READ_TIMEOUT": "2",
    "STREAMGUARD_LIMITS__DRAIN_TIMEOUT": "5",
}
ENV = {**ENV_BASE, "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true", "STREAMGUARD_DELIVERY__MAX_ATTEMPTS": "1000"}
SEG = 1  # segment_seconds
PROMPT = 2.0  # a healthy destination gets each record within this many seconds of it being stored
ENVELOPE_KEYS = {"event", "eventId", "timestamp", "projectId", "metadata", "data"}
ERROR_KEYS = {"success", "error", "timestamp", "path"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s, 25 fps, 1 s GOPs (so 1 s segments cut on time), no B-frames."""
    return ls.make_test_video(tmp_path_factory.mktemp("dlv-video") / "v.mp4", seconds=20, fps=25,
                              width=160, height=120, gop=25, red_ranges=((10.0, 13.0),))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    """One daemon (private callbacks allowed, effectively unlimited attempts) for the
    tests that do not stop it; each test uses its own project."""
    with Daemon(tmp_path_factory.mktemp("dlv-daemon"), test_bundle, ENV) as d:
        yield d


@pytest.fixture
def stream_url(live_video: Path, rtmp: ls.RtmpServer, request: pytest.FixtureRequest):
    """A live RTMP stream (several tasks may read it at once)."""
    url = rtmp.url(re.sub(r"\W", "_", request.node.name)[:40])
    with ls.Publisher(live_video, url) as _pub:
        yield url


@pytest.fixture
def receiver():
    with Receiver() as rx:
        yield rx


# --------------------------------------------------------------------------- helpers


def start_task(d: Daemon, key: str, url: str, callback: str | None, **params: Any) -> str:
    body = {"url": url, "segment_seconds": SEG, **params}
    if callback is not None:
        body["callback_url"] = callback
    reply = d.call("POST", "/v1/streams", body, key=key)
    assert reply.status == 200, reply.body
    return reply.body["data"]["task_id"]


def stop_task(d: Daemon, key: str, task_id: str) -> dict:
    reply = d.call("POST", f"/v1/streams/{task_id}/stop", key=key)
    assert reply.status == 200, reply.body
    assert reply.data["state"] == "stopped", reply.data
    return reply.data


def project(d: Daemon, key: str) -> dict:
    reply = d.call("GET", "/v1/project", key=key)
    assert reply.status == 200, reply.body
    return reply.data


def deliveries(d: Daemon, key: str, status: str | None = None, task_id: str | None = None) -> list[dict]:
    """Every delivery of the key's project (all pages), oldest first."""
    out, page = [], 1
    while True:
        q = f"?page={page}&pageSize=100" + (f"&status={status}" if status else "")
        reply = d.call("GET", "/v1/deliveries" + q, key=key)
        assert reply.status == 200, reply.body
        out += reply.data["items"]
        if len(out) >= reply.data["total"] or not reply.data["items"]:
            break
        page += 1
    out = [x for x in reversed(out) if task_id is None or x["taskId"] == task_id]  # listed newest first
    return sorted(out, key=lambda x: ts(x["createdAt"]))  # stable: same-transaction rows keep their order


def ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def segment_count(d: Daemon, task_id: str, key: str) -> int:
    return sum(1 for r in d.records(task_id, key) if r["data"]["status"] == 0)


def arrived_segments(rx: Request | Receiver, task_id: str) -> list[dict]:
    """Unique stream.segment bodies with status 0 for the task, in first-arrival order."""
    return [r.json for r in rx.unique_by_id()
            if r.event == "stream.segment" and r.json["task_id"] == task_id and r.json["data"]["status"] == 0]


def got_event(rx: Receiver, event: str, task_id: str) -> bool:
    return any(r.event == event and r.json["data"]["task_id"] == task_id for r in rx.snapshot()
               if r.event in ("stream.started", "stream.stopped"))


def positions(requests: list[Request], records: list[dict], task_id: str) -> list[int]:
    """Where each request stands in the task's sequence: stream.started -1, each
    stored record its index in GET records, stream.stopped len(records)."""
    index = {canon(r): i for i, r in enumerate(records)}
    out = []
    for r in requests:
        body = r.json
        if r.event == "stream.started":
            assert body["data"]["task_id"] == task_id, body
            out.append(-1)
        elif r.event == "stream.stopped":
            assert body["data"]["task_id"] == task_id, body
            out.append(len(records))
        else:
            assert r.event == "stream.segment", r.headers
            assert body["task_id"] == task_id, body
            assert canon(body) in index, f"delivered record is not a stored record: {body}"
            out.append(index[canon(body)])
    return out


def assert_complete_and_ordered(rx: Receiver, records: list[dict], task_id: str,
                                requests: list[Request] | None = None) -> list[Request]:
    """Every stored record and both task events arrived; no arrival (retries and
    duplicates included) ever went back in the sequence; the first arrival of each
    webhook-id is the sequence itself; duplicates are byte-identical and share their
    webhook-id. Returns the unique requests."""
    reqs = rx.snapshot() if requests is None else requests
    pos = positions(reqs, records, task_id)
    assert pos == sorted(pos), f"a later record overtook an earlier one: {pos}"
    first: dict[str, Request] = {}
    by_body: dict[bytes, str] = {}
    for r in reqs:
        assert r.id, r.headers
        if r.id in first:
            assert r.body == first[r.id].body, f"two different bodies share webhook-id {r.id}"
        first.setdefault(r.id, r)
        assert by_body.setdefault(r.body, r.id) == r.id, f"the same body was sent under two webhook-ids: {r.body!r}"
    unique = list(first.values())
    assert positions(unique, records, task_id) == list(range(-1, len(records) + 1)), \
        (positions(unique, records, task_id), len(records))
    return unique


def assert_tiling(records: list[dict], last_status: int) -> None:
    segs = [r["data"]["data"] for r in records[:-1]]
    assert all(r["data"]["status"] == 0 for r in records[:-1]), [r["data"]["status"] for r in records]
    assert records[-1]["data"]["status"] == last_status, records[-1]
    assert records[-1]["data"]["data"] is None and records[-1]["data"]["token"] is None, records[-1]
    assert [s["segment_index"] for s in segs] == list(range(len(segs))), [s["segment_index"] for s in segs]
    assert segs[0]["start_time"] == "0.000", segs[0]
    for a, b in itertools.pairwise(segs):
        assert a["end_time"] == b["start_time"], (a, b)
        assert float(a["end_time"]) > float(a["start_time"]), a


def assert_headers(r: Request, body: Any) -> None:
    assert r.method == "POST", r.method
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert re.fullmatch(r"\d+", r.headers["webhook-timestamp"]), r.headers
    assert abs(int(r.headers["webhook-timestamp"]) - r.arrived) <= 30, (r.headers, r.arrived)
    assert all(re.fullmatch(r"v1,[A-Za-z0-9+/]+={0,2}", s) for s in r.headers["webhook-signature"].split(" ")), \
        r.headers["webhook-signature"]
    expected_event = body["event"] if "eventId" in body else "stream.segment"
    assert r.headers["x-streamguard-event"] == expected_event, (r.headers, body)
    if "eventId" in body:
        assert r.headers["webhook-id"] == body["eventId"], (r.headers, body)


def assert_envelope(body: dict, event: str, project_id: str, metadata: Any, task_id: str) -> dict:
    assert set(body) == ENVELOPE_KEYS, body
    assert body["event"] == event and body["projectId"] == project_id, body
    assert body["metadata"] == metadata, body
    assert isinstance(body["eventId"], str) and body["eventId"], body
    assert abs(ts(body["timestamp"]) - time.time()) < 300, body
    assert body["data"]["task_id"] == task_id, body
    return body["data"]


def metric(d: Daemon, name: str, labels: str) -> float:
    text = d.call("GET", "/metrics").body.decode()
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# --------------------------------------------------------------------------- a. normal flow


@pytest.mark.live
def test_normal_flow_callback_and_project_webhook(daemon: Daemon, stream_url: str, receiver: Receiver) -> None:
    key = daemon.create_key("dlv-normal")
    with Receiver() as hook:
        put = daemon.call("PUT", "/v1/project/webhook", {"url": hook.url("/project"), "events": ["stream.stopped"]},
                          key=key)
        assert put.status == 200, put.body
        assert put.data["webhook"]["url"] == hook.url("/project") and put.data["webhook"]["events"] == \
            ["stream.stopped"], put.data
        proj = project(daemon, key)
        secret = proj["webhook"]["secret"]
        assert secret.startswith("whsec_"), proj
        metadata = {"customer": "acme", "n": 7, "nested": {"ok": True}}
        task_id = start_task(daemon, key, stream_url, receiver.url("/cb?x=1"), metadata=metadata,
                             enable_content_moderation=True)

        receiver.wait_for(lambda: len(arrived_segments(receiver, task_id)) >= 3, 30, "3 segment records")
        stop_task(daemon, key, task_id)
        receiver.wait_for(lambda: got_event(receiver, "stream.stopped", task_id), 15, "stream.stopped")
        hook.wait_for(lambda: got_event(hook, "stream.stopped", task_id), 15, "stream.stopped at the project hook")

        records = daemon.records(task_id, key)
        assert_tiling(records, 14)
        reqs = receiver.snapshot()
        assert all(r.path == "/cb?x=1" for r in reqs), {r.path for r in reqs}
        # a healthy receiver: each request exactly once, in order
        assert len({r.id for r in reqs}) == len(reqs), [r.id for r in reqs]
        unique = assert_complete_and_ordered(receiver, records, task_id)
        pairs = receiver.verified(secret)  # raises unless every request verifies
        for r, (_, body) in zip(reqs, pairs):
            assert_headers(r, body)

        started = assert_envelope(unique[0].json, "stream.started", proj["id"], metadata, task_id)
        assert started["url"] == stream_url, started
        assert [u.json for u in unique[1:-1]] == records  # the records themselves, byte for byte the stored ones
        assert unique[-2].json["data"]["status"] == 14
        stopped = assert_envelope(unique[-1].json, "stream.stopped", proj["id"], metadata, task_id)
        assert stopped["status"] == 14 and isinstance(stopped["reason"], str) and stopped["reason"], stopped
        assert stopped["segments"] == len(records) - 1, (stopped, len(records))
        flagged = sum(1 for r in records[:-1] if r["data"]["data"]["content_moderation"]["has_unsafe_content"])
        assert stopped["flagged_segments"] == flagged, stopped

        # the project webhook is subscribed to stream.stopped only
        time.sleep(0.5)
        hreqs = hook.snapshot()
        assert [r.event for r in hreqs] == ["stream.stopped"], [r.event for r in hreqs]
        assert all(r.path == "/project" for r in hreqs)
        (_, hbody), = hook.verified(secret)
        assert_headers(hreqs[0], hbody)
        assert assert_envelope(hbody, "stream.stopped", proj["id"], metadata, task_id)["status"] == 14

        # and the outbox agrees: everything delivered, once
        dl = deliveries(daemon, key, task_id=task_id)
        assert len(dl) == len(records) + 2 + 1, [(x["event"], x["url"]) for x in dl]
        assert all(x["status"] == "delivered" and x["attempts"] == 1 and x["deliveredAt"] for x in dl), dl
        assert {x["url"] for x in dl} == {receiver.url("/cb?x=1"), hook.url("/project")}
        assert deliveries(daemon, key, status="pending", task_id=task_id) == []


# --------------------------------------------------------------------------- b. receiver down, 500, slow, back


@pytest.mark.live
def test_receiver_down_then_failing_then_slow_then_recovers(daemon: Daemon, stream_url: str) -> None:
    key = daemon.create_key("dlv-recover")
    secret = project(daemon, key)["webhook"]["secret"]
    retries_before = metric(daemon, "streamguard_deliveries_total", 'result="retry"')
    with Receiver("down", slow_seconds=SLOW) as rx:
        task_id = start_task(daemon, key, stream_url, rx.url())

        # down: refused connections, deliveries wait in the outbox with the error
        daemon.wait_for(lambda: segment_count(daemon, task_id, key) >= 2, 20, "2 records stored")
        pend = daemon.wait_for(lambda: [x for x in deliveries(daemon, key, "pending", task_id)
                                        if x["attempts"] >= 1 and x["lastError"]], 10, "a failed attempt")
        assert pend[0]["event"] == "stream.started" and pend[0]["lastStatusCode"] is None, pend[0]
        assert rx.snapshot() == []

        # 500s
        rx.mode = "error"
        rx.wait_for(lambda: sum(r.answered == 500 for r in rx.snapshot()) >= 2, 10, "two 500 answers")
        daemon.wait_for(lambda: any(x["lastStatusCode"] == 500 and "500" in (x["lastError"] or "")
                                    for x in deliveries(daemon, key, "pending", task_id)), 5, "lastError HTTP 500")
        time.sleep(1.5)

        # answers after the delivery timeout
        rx.mode = "slow"
        rx.wait_for(lambda: sum(r.mode == "slow" for r in rx.snapshot()) >= 2, 10, "two requests while slow")
        daemon.wait_for(lambda: any("within" in (x["lastError"] or "") or "imeout" in (x["lastError"] or "")
                                    for x in deliveries(daemon, key, "pending", task_id)), 5, "a timeout error")
        # nothing got through while the receiver misbehaved (the started event heads the line)
        assert {r.event for r in rx.snapshot()} <= {"stream.started"}, rx.events()

        backlog = segment_count(daemon, task_id, key)
        assert backlog >= 5, backlog
        rx.mode = "ok"
        recovered = time.time()
        rx.wait_for(lambda: len(arrived_segments(rx, task_id)) >= backlog + 2, 20,
                    f"the backlog of {backlog} records and two more")
        stop_task(daemon, key, task_id)
        rx.wait_for(lambda: got_event(rx, "stream.stopped", task_id), 15, "stream.stopped")

        records = daemon.records(task_id, key)
        assert_tiling(records, 14)
        assert_complete_and_ordered(rx, records, task_id)
        rx.verified(secret)
        dupes = len(rx.snapshot()) - len(rx.unique_by_id())
        assert dupes >= 1, "the slow phase should have produced at least one duplicate (same webhook-id)"
        # the backlog drained quickly once the receiver was back (backoff capped at 1 s)
        first_ok = [r.arrived for r in rx.snapshot() if r.mode == "ok"]
        assert first_ok and first_ok[0] - recovered < 3, first_ok[:1]

        dl = deliveries(daemon, key, task_id=task_id)
        assert len(dl) == len(records) + 2, len(dl)
        assert all(x["status"] == "delivered" for x in dl), [(x["event"], x["status"], x["lastError"]) for x in dl]
        assert dl[0]["attempts"] > 3, dl[0]  # stream.started waited through every phase
        assert deliveries(daemon, key, "pending", task_id) == [] and deliveries(daemon, key, "failed", task_id) == []
    assert metric(daemon, "streamguard_deliveries_total", 'result="retry"') > retries_before


# --------------------------------------------------------------------------- c. isolation


@pytest.mark.live
def test_dead_receiver_does_not_delay_another_task(daemon: Daemon, stream_url: str, receiver: Receiver) -> None:
    """Task A's callback refuses connections, task S's answers too late, and the
    project webhook (every event of every task, B's included) answers too late
    as well: B's callback still gets each record within seconds of it being stored."""
    key = daemon.create_key("dlv-isolation")
    dead = f"http://127.0.0.1:{ls.closed_port()}/dead"
    with Receiver("slow", slow_seconds=SLOW) as slow, Receiver("slow", slow_seconds=SLOW) as hook:
        put = daemon.call("PUT", "/v1/project/webhook", {"url": hook.url("/all"), "events": []}, key=key)
        assert put.status == 200, put.body
        task_a = start_task(daemon, key, stream_url, dead)
        task_s = start_task(daemon, key, stream_url, slow.url("/slow"))
        task_b = start_task(daemon, key, stream_url, receiver.url("/b"))

        # watch B's records appear in the store, and when each reaches the receiver
        seen_stored: dict[int, float] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(seen_stored) < 8:
            for r in daemon.records(task_b, key):
                if r["data"]["status"] == 0:
                    seen_stored.setdefault(r["data"]["data"]["segment_index"], time.time())
            time.sleep(0.1)
        assert len(seen_stored) >= 8, seen_stored
        receiver.wait_for(lambda: len(arrived_segments(receiver, task_b)) >= len(seen_stored), 5,
                          "B's stored records at B's receiver")
        arrived = {}
        for r in receiver.unique_by_id():
            body = r.json
            if r.event == "stream.segment" and body["data"]["status"] == 0:
                arrived[body["data"]["data"]["segment_index"]] = r.arrived
        lag = {i: arrived.get(i, float("inf")) - t for i, t in seen_stored.items()}
        late = {i: round(s, 2) for i, s in lag.items() if s > PROMPT}
        assert not late, f"B's records reached B's receiver late (s after being stored): {late}"

        # the outbox's own clock says the same: B's deliveries went out promptly
        dl_b = [x for x in deliveries(daemon, key, task_id=task_b) if x["url"] == receiver.url("/b")]
        delivered_b = [x for x in dl_b if x["status"] == "delivered"]
        assert len(delivered_b) >= len(seen_stored), dl_b
        slow_b = [(x["event"], round(ts(x["deliveredAt"]) - ts(x["createdAt"]), 2)) for x in delivered_b
                  if ts(x["deliveredAt"]) - ts(x["createdAt"]) > PROMPT]
        assert not slow_b, slow_b
        assert all(x["attempts"] == 1 for x in delivered_b), delivered_b

        # the others pile up as pending, each in its own line (task x destination)
        lines = [(task_a, dead), (task_s, slow.url("/slow"))] + [(t, hook.url("/all")) for t in (task_a, task_s, task_b)]
        for task, url in lines:
            stored = len(daemon.records(task, key))
            dl = [x for x in deliveries(daemon, key, task_id=task) if x["url"] == url]
            assert all(x["status"] == "pending" for x in dl), [(x["event"], x["status"]) for x in dl]
            assert len(dl) >= 1 + stored, (len(dl), stored)
            assert dl[0]["event"] == "stream.started" and dl[0]["attempts"] >= 2, dl[0]
            assert all(x["attempts"] == 0 for x in dl[1:]), "a later record was tried before the first got through"
        assert {r.event for r in slow.snapshot()} == {"stream.started"}, slow.events()
        assert {r.event for r in hook.snapshot()} == {"stream.started"}, hook.events()
        assert receiver.verified(project(daemon, key)["webhook"]["secret"])

        for task in (task_a, task_s, task_b):
            stop_task(daemon, key, task)
        receiver.wait_for(lambda: got_event(receiver, "stream.stopped", task_b), 10, "B's stream.stopped")
        assert_complete_and_ordered(receiver, daemon.records(task_b, key), task_b)


# --------------------------------------------------------------------------- d. SIGKILL and restart


@pytest.mark.live
def test_sigkill_mid_stream_then_restart_loses_nothing(tmp_path: Path, test_bundle: Path, stream_url: str,
                                                       receiver: Receiver) -> None:
    d1 = Daemon(tmp_path / "data", test_bundle, ENV).start()
    d2 = None
    try:
        key = d1.create_key("dlv-crash")
        secret = project(d1, key)["webhook"]["secret"]
        task_id = start_task(d1, key, stream_url, receiver.url())
        receiver.wait_for(lambda: len(arrived_segments(receiver, task_id)) >= 3, 30, "3 records delivered")
        stored_before = d1.records(task_id, key)
        # kill while a request is in flight (the receiver holds it past the timeout): that one
        # was sent but never acknowledged, so it must go out again, same webhook-id, after the restart
        receiver.mode = "slow"
        in_flight = receiver.wait_for(lambda: [r for r in receiver.snapshot() if r.mode == "slow"], 10,
                                      "a request to hold")[0]
        d1.kill()
        killed_at = time.time()
        assert killed_at - in_flight.arrived < DELIVERY_TIMEOUT, "the kill came too late to catch it in flight"
        receiver.mode = "ok"

        d2 = Daemon(tmp_path / "data", test_bundle, ENV).start()
        d2.wait_for(lambda: d2.call("GET", f"/v1/streams/{task_id}", key=key).data["state"] == "running", 30,
                    "the same task to run again")
        # everything stored before the kill is still there, unchanged
        assert d2.records(task_id, key)[:len(stored_before)] == stored_before
        n_before = len(stored_before)
        receiver.wait_for(lambda: len(arrived_segments(receiver, task_id)) >= n_before + 3, 30,
                          "records after the restart")
        again = [r for r in receiver.snapshot() if r.id == in_flight.id and r.arrived > killed_at]
        assert again and again[0].body == in_flight.body, "the request in flight at the kill was not sent again"
        stop_task(d2, key, task_id)
        receiver.wait_for(lambda: got_event(receiver, "stream.stopped", task_id), 15, "stream.stopped")

        records = d2.records(task_id, key)
        assert records[:n_before] == stored_before
        assert_tiling(records, 14)  # contiguous 0..N, times tile across the restart, ends with 14
        assert_complete_and_ordered(receiver, records, task_id)
        receiver.verified(secret)
        stopped = [r.json for r in receiver.unique_by_id() if r.event == "stream.stopped"]
        assert len(stopped) == 1 and stopped[0]["data"]["status"] == 14, stopped
        assert stopped[0]["data"]["segments"] == len(records) - 1, (stopped[0]["data"], len(records))
        d2.wait_for(lambda: not deliveries(d2, key, "pending", task_id), 10, "an empty outbox")
        assert deliveries(d2, key, "failed", task_id) == []
    finally:
        d1.kill()
        if d2 is not None:
            d2.kill()


# --------------------------------------------------------------------------- e. retries exhausted, manual retry


@pytest.mark.live
def test_retries_exhausted_then_manual_retry(tmp_path: Path, test_bundle: Path, stream_url: str) -> None:
    env = {**ENV, "STREAMGUARD_DELIVERY__MAX_ATTEMPTS": "3"}
    with Daemon(tmp_path / "data", test_bundle, env) as d, Receiver("down") as rx:
        key = d.create_key("dlv-exhausted")
        secret = project(d, key)["webhook"]["secret"]
        retries_before = metric(d, "streamguard_deliveries_total", 'result="retry"')
        task_id = start_task(d, key, stream_url, rx.url())
        d.wait_for(lambda: segment_count(d, task_id, key) >= 2, 20, "2 records")
        stop_task(d, key, task_id)
        records = d.records(task_id, key)
        want = len(records) + 2
        d.wait_for(lambda: len(deliveries(d, key, "failed", task_id)) == want, 30, f"{want} failed deliveries")
        failed = deliveries(d, key, "failed", task_id)
        assert [x["event"] for x in failed] == ["stream.started"] + ["stream.segment"] * len(records) + \
            ["stream.stopped"], [x["event"] for x in failed]
        for x in failed:
            assert x["attempts"] == 3 and x["lastError"] and x["deliveredAt"] is None, x
            assert x["nextAttemptAt"] is None, x
        assert deliveries(d, key, "pending", task_id) == [] and deliveries(d, key, "delivered", task_id) == []
        assert metric(d, "streamguard_deliveries_total", 'result="failed"') >= want
        assert metric(d, "streamguard_deliveries_total", 'result="retry"') >= retries_before + 2 * want
        assert rx.snapshot() == []

        missing = d.call("POST", "/v1/deliveries/dlv_nope/retry", key=key)
        assert missing.status == 404, missing.body
        other = d.create_key("dlv-someone-else")
        foreign = d.call("POST", f"/v1/deliveries/{failed[0]['id']}/retry", key=other)
        assert foreign.status == 404, foreign.body

        rx.up()
        for x in failed:  # oldest first
            reply = d.call("POST", f"/v1/deliveries/{x['id']}/retry", key=key)
            assert reply.status == 200, reply.body
            assert reply.data["id"] == x["id"] and reply.data["status"] in ("pending", "delivered"), reply.data
        d.wait_for(lambda: len(deliveries(d, key, "delivered", task_id)) == want, 15, "every retry delivered")
        assert deliveries(d, key, "failed", task_id) == []
        assert_complete_and_ordered(rx, records, task_id)
        assert len(rx.snapshot()) == want
        rx.verified(secret)


# --------------------------------------------------------------------------- f. private addresses refused


@pytest.fixture(scope="module")
def strict_daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    """delivery.allow_private left at its default (false)."""
    d = Daemon(tmp_path_factory.mktemp("dlv-strict"), test_bundle, ENV_BASE).start()
    try:
        yield d
    finally:
        d.kill()


def assert_refused(reply, field: str, needle: str) -> None:
    assert reply.status == 400, reply.body
    assert set(reply.body) == ERROR_KEYS and reply.body["success"] is False, reply.body
    assert reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body
    assert needle in reply.error["message"].lower(), reply.error
    assert field in reply.error["message"] or (reply.error.get("details") or {}).get("field") == field, reply.error


def test_private_callback_urls_are_refused_by_default(strict_daemon: Daemon, receiver: Receiver) -> None:
    d = strict_daemon
    key = d.create_key("dlv-private")
    p = receiver.port
    with ls.SilentServer() as silent:
        source = silent.url("rtmp", "/live/x")
        private = [f"http://127.0.0.1:{p}/x", f"http://localhost:{p}/x", "http://169.254.169.254/x",
                   "http://10.0.0.1/x", "http://192.168.1.10/x", "http://172.16.0.1/x", f"http://[::1]:{p}/x",
                   f"http://[::ffff:127.0.0.1]:{p}/x", f"http://2130706433:{p}/x", f"http://127.1:{p}/x",
                   f"http://0.0.0.0:{p}/x", "https://[fe80::1]/x"]
        for url in private:
            reply = d.call("POST", "/v1/streams", {"url": source, "callback_url": url}, key=key)
            assert_refused(reply, "callback_url", "private")
            assert "allow_private" in reply.error["message"], reply.error
        for url, needle in [("http://user:pw@example.com/x", "credentials"),
                            (f"http://user@127.0.0.1:{p}/x", "credentials"),
                            ("ftp://x", "http"), ("ftp://example.com/x", "http"), ("file:///etc/passwd", "http"),
                            ("http:///x", "http"), ("not a url", "http")]:
            assert_refused(d.call("POST", "/v1/streams", {"url": source, "callback_url": url}, key=key),
                           "callback_url", needle)
        for url in (f"http://127.0.0.1:{p}/hook", f"http://localhost:{p}/hook", "http://169.254.169.254/latest"):
            assert_refused(d.call("PUT", "/v1/project/webhook", {"url": url, "events": []}, key=key), "url", "private")
        assert project(d, key)["webhook"]["url"] is None
        # a public address passes the check (subscribed to an event that never fires here: nothing is sent)
        ok = d.call("PUT", "/v1/project/webhook", {"url": "http://93.184.216.34/hook",
                                                   "events": ["categorization.failed"]}, key=key)
        assert ok.status == 200 and ok.data["webhook"]["url"] == "http://93.184.216.34/hook", ok.body
        listed = d.call("GET", "/v1/streams", key=key)
        assert listed.status == 200 and listed.data["total"] == 0, listed.body  # no task was created
        assert silent.accepted == 0
    time.sleep(1.0)
    assert receiver.snapshot() == [] and receiver.connections == 0, "a refused URL was contacted"
    assert deliveries(d, key) == []


def test_shared_address_space_callback_is_refused(strict_daemon: Daemon) -> None:
    """100.64.0.0/10 (RFC 6598 carrier-grade NAT space) is not a public address; cloud
    metadata services live there too (e.g. 100.100.100.200)."""
    key = strict_daemon.create_key("dlv-cgnat")
    # subscribed to an event that never fires here, so even if accepted nothing is sent
    reply = strict_daemon.call("PUT", "/v1/project/webhook", {"url": "http://100.100.100.200/latest",
                                                              "events": ["categorization.failed"]}, key=key)
    assert_refused(reply, "url", "private")


# --------------------------------------------------------------------------- g. secret rotation


@pytest.mark.live
def test_secret_rotation_signs_with_both_secrets(daemon: Daemon, stream_url: str, receiver: Receiver) -> None:
    key = daemon.create_key("dlv-rotate")
    old = project(daemon, key)["webhook"]["secret"]
    task_id = start_task(daemon, key, stream_url, receiver.url())
    receiver.wait_for(lambda: len(arrived_segments(receiver, task_id)) >= 2, 30, "2 records")
    rotated = daemon.call("POST", "/v1/project/webhook/rotate-secret", key=key)
    assert rotated.status == 200, rotated.body
    new = rotated.data["webhook"]["secret"]
    assert new.startswith("whsec_") and new != old, (old, new)
    assert project(daemon, key)["webhook"]["secret"] == new
    rotated_at = time.time()

    def new_signed() -> list[Request]:
        out = []
        for r in receiver.snapshot():
            try:
                receiver.verified(new, [r])
                out.append(r)
            except AssertionError:
                pass
        return out

    receiver.wait_for(lambda: len(new_signed()) >= 2 and receiver.snapshot()[-1].arrived > rotated_at + 3.5, 15,
                      "deliveries signed with the new secret")
    stop_task(daemon, key, task_id)
    receiver.wait_for(lambda: got_event(receiver, "stream.stopped", task_id), 15, "stream.stopped")

    reqs = receiver.snapshot()
    receiver.verified(old)  # the grace period: everything still verifies with the old secret
    after = [r for r in reqs if r.arrived > rotated_at + 3]  # senders pick a rotation up within seconds
    assert after, "no delivery after the rotation"
    receiver.verified(new, after)
    for r in after:
        assert len(r.headers["webhook-signature"].split(" ")) == 2, r.headers["webhook-signature"]
    before = [r for r in reqs if r.arrived < rotated_at]
    assert before
    with pytest.raises(AssertionError):
        receiver.verified(new, before[:1])
    assert receiver.events()[-1] == "stream.stopped"
    assert_complete_and_ordered(receiver, daemon.records(task_id, key), task_id)


# --------------------------------------------------------------------------- h. redirects are not followed


def test_redirect_is_not_followed(daemon: Daemon) -> None:
    key = daemon.create_key("dlv-redirect")
    with Receiver() as target, Receiver("redirect") as rx, ls.SilentServer() as silent:
        rx.redirect_to = target.url("/target")
        task_id = start_task(daemon, key, silent.url("rtmp", "/live/x"), rx.url())
        rx.wait_for(lambda: len(rx.snapshot()) >= 3, 10, "three attempts")
        pend = daemon.wait_for(lambda: [x for x in deliveries(daemon, key, "pending", task_id)
                                        if x["lastStatusCode"] == 302], 5, "a pending delivery with status 302")
        assert pend[0]["event"] == "stream.started" and "302" in pend[0]["lastError"], pend[0]
        assert len({r.id for r in rx.snapshot()}) == 1, "only the head of the line is tried"
        assert all(r.answered == 302 for r in rx.snapshot()[:3])
        stop_task(daemon, key, task_id)
    assert target.snapshot() == [] and target.connections == 0, "the redirect was followed"
    assert not any(x["status"] == "delivered" for x in deliveries(daemon, key, task_id=task_id))


def test_private_address_refusal_names_the_address(strict_daemon: Daemon) -> None:
    """The 400 says which address was refused, so a user can tell which host to fix
    (localhost -> 127.0.0.1, a name that resolves to 10.x ...)."""
    key = strict_daemon.create_key("dlv-private-named")
    with ls.SilentServer() as silent:
        for url, names in [("http://10.0.0.1/x", ("10.0.0.1",)), ("http://169.254.169.254/x", ("169.254.169.254",)),
                           ("http://localhost/x", ("127.0.0.1", "::1"))]:
            reply = strict_daemon.call("POST", "/v1/streams", {"url": silent.url("rtmp", "/live/x"),
                                                              "callback_url": url}, key=key)
            assert_refused(reply, "callback_url", "private")
            shown = reply.error["message"] + json.dumps(reply.error.get("details"))
            assert any(n in shown for n in names), f"{url}: the refusal does not name the address: {reply.error}"
