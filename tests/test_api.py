"""The HTTP API against a real daemon: envelope, auth, validation, scoping,
capacity and balance at start, keys CLI, OpenAPI, metrics."""

from __future__ import annotations

import json
import socket

import pytest

from daemon import Daemon
from streamguard.schemas import EVENTS
from live_servers import SilentServer, closed_port

ENVELOPE_KEYS = {"success", "error", "timestamp", "path"}


@pytest.fixture(scope="module")
def daemon(test_bundle, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("api"), test_bundle, env={
        "STREAMGUARD_LIMITS__MAX_TASKS": "2", "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "20",
        "STREAMGUARD_LIVE__READ_TIMEOUT": "2"})
    with d:
        yield d


@pytest.fixture(scope="module")
def key(daemon):
    return daemon.create_key("alpha")


def assert_error(reply, status: int, code: str, needle: str = "") -> None:
    assert reply.status == status, reply.body
    assert set(reply.body) == ENVELOPE_KEYS, reply.body
    assert reply.body["success"] is False
    assert reply.error["code"] == code
    assert needle in reply.error["message"]
    assert reply.body["path"].startswith("/")


def test_public_endpoints(daemon):
    assert daemon.call("GET", "/healthz").body["status"] == "ok"
    ready = daemon.call("GET", "/readyz")
    assert ready.status == 200 and ready.body["checks"]["store_writable"] is True
    metrics = daemon.call("GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    text = metrics.body.decode()
    for name in ("streamguard_active_tasks", "streamguard_segments_total", "streamguard_segment_latency_seconds",
                 "streamguard_inference_batch_size", "streamguard_inference_queue_depth",
                 "streamguard_source_reconnects_total", "streamguard_frames_decoded_total"):
        assert f"# HELP {name}" in text


def test_openapi_documents_every_route(daemon):
    doc = daemon.call("GET", "/openapi.json").body
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path, method in [("/v1/streams", "post"), ("/v1/streams", "get"), ("/v1/streams/{task_id}", "get"),
                         ("/v1/streams/{task_id}/stop", "post"), ("/v1/streams/{task_id}", "delete"),
                         ("/v1/streams/{task_id}/records", "get"), ("/v1/project", "get"), ("/healthz", "get"),
                         ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    req = doc["components"]["schemas"]["StreamRequest"]
    assert req["required"] == ["url"]
    assert req["properties"]["fps"]["minimum"] == 1 and req["properties"]["fps"]["maximum"] == 30


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_auth_failures(daemon, headers):
    import urllib.request
    from daemon import request
    key = headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
    if headers.get("Authorization", "").startswith("Basic"):
        req = urllib.request.Request(daemon.base + "/v1/streams", headers=headers)
        try:
            urllib.request.urlopen(req)
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        return
    reply = request(daemon.base, "GET", "/v1/streams", key=key)
    assert_error(reply, 401, "STREAMGUARD_UNAUTHORIZED")
    assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")


def test_revoked_key_is_refused(daemon):
    k = daemon.create_key("revoked-project")
    assert daemon.call("GET", "/v1/streams", key=k).status == 200
    assert daemon.cli("keys", "revoke", k).returncode == 0
    assert_error(daemon.call("GET", "/v1/streams", key=k), 401, "STREAMGUARD_UNAUTHORIZED", "revoked")


BAD_BODIES = [
    ({"url": "rtmp://127.0.0.1/live/x", "fps": 0}, "fps must be between 1 and 30"),
    ({"url": "rtmp://127.0.0.1/live/x", "fps": 31}, "fps must be between 1 and 30"),
    ({"url": "rtmp://127.0.0.1/live/x", "segment_seconds": 61}, "segment_seconds must be between 1 and 60"),
    ({"url": "rtmp://127.0.0.1/live/x", "threshold": 1.5}, "threshold must be between 0 and 1"),
    ({"url": "rtmp://127.0.0.1/live/x", "max_logos": 51}, "max_logos must be between 1 and 50"),
    ({"url": "rtmp://127.0.0.1/live/x", "fps": "ten"}, "Expected `int`"),
    ({"url": "rtmp://127.0.0.1/live/x", "enable_content_moderation": "yes"}, "Expected `bool`"),
    ({"url": "rtmp://127.0.0.1/live/x", "surprise": 1}, "unknown field"),
    ({"fps": 2}, "url is required"),
    ({"url": "ftp://127.0.0.1/x"}, "url must be"),
    ({"url": ""}, "url"),
    ([1, 2], "Expected `object`"),
]


@pytest.mark.parametrize("body,needle", BAD_BODIES)
def test_invalid_stream_requests(daemon, key, body, needle):
    assert_error(daemon.call("POST", "/v1/streams", body, key=key), 400, "STREAMGUARD_INPUT_INVALID", needle)


def test_malformed_json_wrong_type_and_oversize(daemon, key):
    assert_error(daemon.call("POST", "/v1/streams", key=key, raw=b'{"url": '), 400, "STREAMGUARD_INPUT_INVALID",
                 "malformed JSON")
    assert_error(daemon.call("POST", "/v1/streams", key=key, raw=b"url=x", content_type="text/plain"), 415,
                 "STREAMGUARD_UNSUPPORTED_MEDIA_TYPE")
    huge = b'{"url": "rtmp://127.0.0.1/x", "metadata": {"x": "' + b"a" * (2 << 20) + b'"}}'
    assert_error(daemon.call("POST", "/v1/streams", key=key, raw=huge), 413, "STREAMGUARD_PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("query,needle", [("?pageSize=101", "pageSize"), ("?page=0", "page"),
                                          ("?state=zombie", "state"), ("?page=x", "page")])
def test_invalid_list_queries(daemon, key, query, needle):
    assert_error(daemon.call("GET", "/v1/streams" + query, key=key), 400, "STREAMGUARD_INPUT_INVALID", needle)


def test_unknown_task_and_route(daemon, key):
    assert_error(daemon.call("GET", "/v1/streams/tsk_nope", key=key), 404, "STREAMGUARD_NOT_FOUND")
    assert_error(daemon.call("POST", "/v1/streams/tsk_nope/stop", key=key), 404, "STREAMGUARD_NOT_FOUND")
    assert_error(daemon.call("GET", "/v1/nothing-here", key=key), 404, "STREAMGUARD_NOT_FOUND")


def test_project_scoping_capacity_and_stop(daemon, key):
    other = daemon.create_key("beta")
    with SilentServer() as silent:
        first = daemon.call("POST", "/v1/streams", {"url": silent.url("rtmp")}, key=key)
        assert first.status == 200, first.body
        assert first.body["code"] == "200" and first.body["message"] == "SUCCESS"
        assert first.body["data"]["message"] == "stream started"
        tid = first.body["data"]["task_id"]
        second = daemon.call("POST", "/v1/streams", {"url": f"rtmp://127.0.0.1:{closed_port()}/live/x"}, key=other)
        assert second.status == 200
        # capacity (max_tasks = 2)
        assert_error(daemon.call("POST", "/v1/streams", {"url": silent.url("rtmp")}, key=key), 429,
                     "STREAMGUARD_CAPACITY_REACHED")
        # another project's task is invisible
        for method, path in [("GET", f"/v1/streams/{tid}"), ("POST", f"/v1/streams/{tid}/stop"),
                             ("DELETE", f"/v1/streams/{tid}"), ("GET", f"/v1/streams/{tid}/records")]:
            assert_error(daemon.call(method, path, key=other), 404, "STREAMGUARD_NOT_FOUND")
        listed = daemon.call("GET", "/v1/streams?state=starting", key=key).data
        assert [t["task_id"] for t in listed["items"]] == [tid] and listed["total"] == 1
        assert listed["page"] == 1 and listed["pageSize"] == 20
        view = daemon.call("GET", f"/v1/streams/{tid}", key=key).data
        assert view["state"] in ("starting", "running") and view["status"] is None
        assert view["playlist_url"].endswith(f"/media/{tid}/master.m3u8")
        assert view["node"] == socket.gethostname()  # one node: cluster.node_id defaults to the host name
        # stop both; the stop of the first is synchronous and final
        stopped = daemon.call("DELETE", f"/v1/streams/{tid}", key=key)
        assert stopped.status == 200 and stopped.data["state"] == "stopped" and stopped.data["status"] == 14
        records = daemon.records(tid, key)
        assert records[-1]["data"]["status"] == 14 and records[-1]["data"]["data"] is None
        assert records[-1]["data"]["token"] is None
        page = daemon.call("GET", f"/v1/streams/{tid}/records", key=key).data
        assert page["next_after"] is None
        again = daemon.call("POST", f"/v1/streams/{tid}/stop", key=key)  # idempotent
        assert again.status == 200 and again.data["status"] == 14
        daemon.call("POST", f"/v1/streams/{second.body['data']['task_id']}/stop", key=other)


def test_encoded_renditions_count_against_capacity(daemon, key):
    """Live transcoding costs CPU: a task counts 1 + its encoded renditions (max_tasks = 2 here)."""
    reply = daemon.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1/live/x",
                                                "renditions": ["source", "360p", "720p"]}, key=key)
    assert_error(reply, 429, "STREAMGUARD_CAPACITY_REACHED")
    assert reply.error["details"]["weight"] == 3


def test_balance_zero_is_402_at_start(daemon):
    broke = daemon.create_key("broke", balance=0)
    assert_error(daemon.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1/live/x"}, key=broke), 402,
                 "STREAMGUARD_INSUFFICIENT_BALANCE")


def test_project_view(daemon, key):
    project = daemon.call("GET", "/v1/project", key=key).data
    assert project["name"] == "alpha"
    assert project["webhook"]["secret"].startswith("whsec_")


def test_keys_cli(daemon):
    res = daemon.cli("keys", "create", "--project", "gamma", "--balance", "500")
    assert res.returncode == 0
    key = res.stdout.strip().splitlines()[-1]
    assert key.startswith("sg_") and len(key) > 30
    assert daemon.cli("keys", "balance", key).stdout.strip() == "500"
    assert daemon.cli("keys", "balance", key, "--set", "42").stdout.strip() == "42"
    assert daemon.cli("keys", "balance", key, "--unmetered").stdout.strip() == "unmetered"
    missing = daemon.cli("keys", "revoke", "sg_unknown")
    assert missing.returncode == 1 and "no such key" in missing.stderr
    bad = daemon.cli("keys", "create", "--project", "gamma", "--balance", "-5")
    assert bad.returncode == 2


# --- request bodies: malformed, oversized and repetitive input -----------------------------

STREAM_URL = b'"rtmp://127.0.0.1/live/x"'


def nested(depth: int) -> bytes:
    """A JSON object `depth` levels deep."""
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("raw,needle", [
    (b'{"url": ' + STREAM_URL + b', "metadata": {"a": "\xff\xfe"}}', "UTF-8"),
    (b'{"url": ' + STREAM_URL + b', "metadata": {"\xc3\x28": 1}}', "UTF-8"),
    (b'{"url": ' + STREAM_URL + b', "metadata": ' + nested(1000) + b"}", "nested"),
    (b'{"url": ' + STREAM_URL + b', "metadata": ' + nested(100_000) + b"}", "nested"),
])
def test_undecodable_bodies_are_400(daemon, key, raw, needle):
    assert_error(daemon.call("POST", "/v1/streams", key=key, raw=raw), 400, "STREAMGUARD_INPUT_INVALID", needle)


@pytest.mark.parametrize("body,field,needle", [
    ({"metadata": {"x": "a" * 16_400}}, "metadata", "16384 bytes"),
    ({"metadata": {f"k{i}": i for i in range(3000)}}, "metadata", "16384 bytes"),
    ({"metadata": {"list": json.loads(b"[" * 32 + b"1" + b"]" * 32)}}, "metadata", "32 levels"),  # 33 in all
    ({"renditions": ["source", "source"]}, "renditions", "more than once"),
    ({"renditions": ["source"] * 10_000}, "renditions", "renditions"),
    ({"callback_url": "http://example.com/" + "a" * 5000}, "callback_url", "4096"),
    # per-category thresholds: known moderation categories only, each within 0..1
    ({"thresholds": {"violence": 0.5, "gunz": 0.2}}, "thresholds", "unknown category 'gunz'"),
    ({"thresholds": {"Sports": 0.2}}, "thresholds", "unknown category 'Sports'"),
    ({"thresholds": {"weapons": 1.5}}, "thresholds", "thresholds.weapons must be between 0 and 1"),
    ({"thresholds": {"weapons": -0.1}}, "thresholds", "thresholds.weapons must be between 0 and 1"),
    ({"thresholds": {"weapons": "high"}}, "thresholds", "Expected `float`"),
    ({"thresholds": [0.5]}, "thresholds", "Expected `object | null`"),
])
def test_stream_request_limits(daemon, key, body, field, needle):
    reply = daemon.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1/live/x", **body}, key=key)
    assert_error(reply, 400, "STREAMGUARD_INPUT_INVALID", needle)
    assert reply.error["details"]["field"] == field, reply.error


def test_metadata_at_the_limits_is_accepted_and_echoed(daemon, key):
    deepest = nested(31)  # inside the metadata object: 32 levels in all
    metadata = {"deep": json.loads(deepest), "pad": ""}
    size = len(json.dumps(metadata, separators=(",", ":")))
    metadata["pad"] = "p" * (16 * 1024 - size)
    reply = daemon.call("POST", "/v1/streams", {"url": f"rtmp://127.0.0.1:{closed_port()}/live/x",
                                                "metadata": metadata}, key=key)
    assert reply.status == 200, reply.body
    task_id = reply.body["data"]["task_id"]
    try:
        assert daemon.call("GET", f"/v1/streams/{task_id}", key=key).data["metadata"] == metadata
    finally:
        daemon.call("POST", f"/v1/streams/{task_id}/stop", key=key)


@pytest.mark.parametrize("events,needle", [
    (["stream.started", "stream.started"], "stream.started more than once"),
    (["stream.segment"] * 10_000, f"at most {len(EVENTS)}"),  # no more entries than there are events
])
def test_webhook_events_are_bounded_and_unique(daemon, key, events, needle):
    reply = daemon.call("PUT", "/v1/project/webhook", {"url": None, "events": events}, key=key)
    assert_error(reply, 400, "STREAMGUARD_INPUT_INVALID", needle)
    assert reply.error["details"]["field"] == "events", reply.error
    assert daemon.call("GET", "/v1/project", key=key).data["webhook"]["events"] == []


def test_json_bodies_over_1_mib_are_413(daemon, key):
    raw = b'{"url": null, "events": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    assert_error(daemon.call("PUT", "/v1/project/webhook", key=key, raw=raw), 413, "STREAMGUARD_PAYLOAD_TOO_LARGE")
