"""The HTTP surface against a real daemon: requests the HTTP parser refuses get
the error envelope and leak no credential to the log; control characters from
clients never reach the log raw; /media misses, 405s and the OpenAPI document.
Plus the log formatter itself (no daemon)."""

from __future__ import annotations

import io
import logging
import socket
import urllib.parse

import pytest

from daemon import Daemon
from live_servers import closed_port

ENVELOPE_KEYS = {"success", "error", "timestamp", "path"}


@pytest.fixture(scope="module")
def daemon(test_bundle, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("surface"), test_bundle, env={
        "STREAMGUARD_SERVER__ACCESS_LOG": "true", "STREAMGUARD_LIVE__OPEN_TIMEOUT": "1",
        "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "3", "STREAMGUARD_LIVE__RECONNECT_MAX_BACKOFF": "1"})
    with d:
        yield d


@pytest.fixture(scope="module")
def key(daemon):
    return daemon.create_key("surface")


def raw_http(daemon: Daemon, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (urllib would refuse or fix them); read the reply to EOF."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_envelope(status: int, headers: dict[str, str], body: bytes, code: str) -> dict:
    import json
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body)
    doc = json.loads(body)
    assert set(doc) == ENVELOPE_KEYS and doc["success"] is False, doc
    assert doc["error"]["code"] == code, doc
    return doc


def test_oversized_header_gets_the_envelope_and_the_key_stays_out_of_the_log(daemon, key):
    secret = key + "x" * 9000  # a real key at the start of an Authorization header over the 8 KB limit
    status, headers, body = raw_http(daemon, (f"GET /v1/streams HTTP/1.1\r\nHost: x\r\n"
                                              f"Authorization: Bearer {secret}\r\n\r\n").encode())
    assert status == 431
    doc = assert_envelope(status, headers, body, "STREAMGUARD_HEADERS_TOO_LARGE")
    assert "8190 bytes" in doc["error"]["message"] and key not in body.decode()
    # a long header that is not the key, and too many headers: the same
    status, headers, body = raw_http(daemon, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert status == 431 and assert_envelope(status, headers, body, "STREAMGUARD_HEADERS_TOO_LARGE")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    status, headers, body = raw_http(daemon, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
    assert status == 431 and assert_envelope(status, headers, body, "STREAMGUARD_HEADERS_TOO_LARGE")
    # a request line the parser cannot read
    status, headers, body = raw_http(daemon, b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
    assert status == 400 and assert_envelope(status, headers, body, "STREAMGUARD_BAD_REQUEST")
    assert daemon.call("GET", "/healthz").status == 200
    log = daemon.log_path.read_text(errors="replace")
    assert key not in log and key[:12] not in log, log[-3000:]


def test_control_characters_from_clients_are_escaped_in_the_log(daemon, key):
    forged = "2026-01-01 00:00:00,000 WARNING streamguard.fake: forged line"
    url = f"rtmp://127.0.0.1:{closed_port()}/live/\x1b[31mred\r\n{forged}"
    started = daemon.call("POST", "/v1/streams", {"url": url}, key=key)
    assert started.status == 200, started.body
    task_id = started.data["task_id"]
    # the access log carries the (percent-decoded) client path as well
    daemon.call("GET", "/v1/streams/" + urllib.parse.quote("\x1b[2J\r\n" + forged), key=key)
    daemon.wait_for(lambda: task_id in daemon.log_path.read_text(errors="replace"), 20, "the task's reconnect log")
    daemon.wait_stopped(task_id, key, 30)
    log = daemon.log_path.read_text(errors="replace")
    assert "\\x1b[31mred\\r\\n" in log, log[-3000:]
    assert "\x1b" not in log and "\r" not in log, repr(log[-3000:])
    assert not any(line.startswith(forged) for line in log.splitlines()), log[-3000:]


def test_missing_media_file_is_a_404_envelope_and_real_files_are_served(daemon):
    status_reply = daemon.call("GET", "/media/tsk_nope/master.m3u8")
    assert status_reply.status == 404 and set(status_reply.body) == ENVELOPE_KEYS
    assert status_reply.body["error"]["code"] == "STREAMGUARD_NOT_FOUND"
    media = daemon.data_dir / "media" / "tsk_test"
    media.mkdir(parents=True, exist_ok=True)
    (media / "master.m3u8").write_text("#EXTM3U\n")
    (daemon.data_dir / "outside.txt").write_text("secret")
    (media / "link.m3u8").symlink_to(daemon.data_dir / "outside.txt")
    ok = daemon.call("GET", "/media/tsk_test/master.m3u8")
    assert ok.status == 200 and ok.body == b"#EXTM3U\n", ok
    assert ok.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert ok.headers["Cache-Control"] == "no-cache" and ok.headers["Access-Control-Allow-Origin"] == "*"
    for path in ("/media/tsk_test/link.m3u8", "/media/tsk_test", "/media/tsk_test/../../outside.txt",
                 "/media/%2e%2e/outside.txt", "/media/tsk_test/%2e%2e/%2e%2e/outside.txt"):
        reply = daemon.call("GET", path)
        assert reply.status == 404 and reply.body["error"]["code"] == "STREAMGUARD_NOT_FOUND", (path, reply)


def test_405_names_the_allowed_methods(daemon, key):
    reply = daemon.call("PUT", "/healthz", {})
    assert reply.status == 405 and reply.body["error"]["code"] == "STREAMGUARD_METHOD_NOT_ALLOWED"
    assert set(reply.headers["Allow"].split(",")) == {"GET", "HEAD"}
    reply = daemon.call("PATCH", "/v1/streams/tsk_x", {}, key=key)
    assert reply.status == 405 and set(reply.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}


def test_openapi_documents_query_parameters_schemes_and_events(daemon):
    doc = daemon.call("GET", "/openapi.json").body
    paths, schemas = doc["paths"], doc["components"]["schemas"]

    def params(path: str, method: str = "get") -> dict[str, dict]:
        return {p["name"]: p for p in paths[path][method].get("parameters", []) if p["in"] == "query"}

    streams = params("/v1/streams")
    assert set(streams) == {"state", "page", "pageSize"}
    assert set(streams["state"]["schema"]["enum"]) == {"starting", "running", "stopped"}
    assert streams["pageSize"]["schema"]["maximum"] == 100 and streams["page"]["schema"]["minimum"] == 1
    assert set(params("/v1/deliveries")) == {"status", "page", "pageSize"}
    assert set(params("/v1/deliveries")["status"]["schema"]["enum"]) == {"pending", "delivered", "failed"}
    records = params("/v1/streams/{task_id}/records")
    assert records["after"]["schema"]["minimum"] == -1 and records["limit"]["schema"]["maximum"] == 1000
    url = schemas["StreamRequest"]["properties"]["url"]
    for scheme in ("rtmp://", "rtmps://", "rtsp://", "rtsps://", "http://", "https://"):
        assert scheme in url["pattern"], url
    assert "rtsps://" in url["description"]
    events = set(schemas["WebhookUpdate"]["properties"]["events"]["items"]["enum"])
    assert {"stream.started", "stream.segment", "stream.stopped", "moderation.completed"} <= events
    assert schemas["Delivery"]["properties"]["event"]["enum"]
    assert "/media/{path}" in paths and "{path:" not in str(paths)
    # what is documented is what the handlers accept
    assert daemon.call("GET", "/v1/streams?pageSize=101").status == 401  # (auth first)


def test_documented_query_limits_are_enforced(daemon, key):
    for query, field in (("?pageSize=101", "pageSize"), ("?state=null", "state"), ("?state=", "state"),
                         ("?page=0", "page")):
        reply = daemon.call("GET", "/v1/streams" + query, key=key)
        assert reply.status == 400 and reply.error["details"]["field"] == field, (query, reply.body)
    assert daemon.call("GET", "/v1/deliveries?status=failed&pageSize=5", key=key).data["pageSize"] == 5
    reply = daemon.call("GET", "/v1/streams/tsk_nope/records?limit=0", key=key)
    assert reply.status in (400, 404)


# --- the log formatter (no daemon) ---------------------------------------------------------

def _formatted(*args, exc: BaseException | None = None) -> str:
    from streamguard.logsafe import FORMAT, SafeFormatter
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter(FORMAT))
    logger = logging.getLogger("test.logsafe")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if exc is not None:
            try:
                raise exc
            except BaseException:
                logger.exception(*args)
        else:
            logger.warning(*args)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_log_formatter_redacts_secrets_everywhere():
    key, secret = "sg_AbCdEf0123456789_-xyz", "whsec_c2VjcmV0c2VjcmV0c2VjcmV0+/="
    text = _formatted("headers %s, key %s, signing with %s", {"Authorization": f"Bearer {key}"}, key, secret,
                      exc=ValueError(f"bad header b'Authorization: Bearer {key}aaaa' and {secret}"))
    for needle in (key, key[3:], "c2VjcmV0c2VjcmV0"):
        assert needle not in text, text
    assert "[redacted]" in text and "Traceback" in text


def test_log_formatter_keeps_every_record_on_its_own_lines():
    text = _formatted("path %s", "/a\r\n2026-01-01 WARNING forged\x1b[2J\x00\x7f\x85")
    assert text.count("\n") == 1 and "\\r\\n2026-01-01 WARNING forged\\x1b[2J\\x00\\x7f\\x85" in text, text
    text = _formatted("failed", exc=RuntimeError("line one\nFORGED record\x1b"))
    lines = text.rstrip("\n").split("\n")
    assert lines[0].endswith("failed") and all(line.startswith("  ") for line in lines[1:]), text
    assert "\x1b" not in text and "\\x1b" in text


@pytest.mark.parametrize("url", ["http://[7::zz", "http://example.com:99999/", "http://" + "a" * 70 + ".com/"])
def test_unparsable_callback_and_webhook_urls_are_400_not_500(daemon, key, url):
    """Found by the Schemathesis run: a bad IPv6 literal or port made urlsplit raise (500)."""
    for reply in (daemon.call("PUT", "/v1/project/webhook", {"url": url}, key=key),
                  daemon.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1/live/x", "callback_url": url},
                              key=key)):
        assert reply.status == 400 and reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body
