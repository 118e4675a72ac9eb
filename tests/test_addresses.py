"""Address rules (CONTRACT §2 "Input addresses", §4) against a real daemon.

Source URLs: loopback, private, link-local (and their IPv4-mapped, NAT64 and
6to4 forms) are refused with 422 unless `sources.allow_private` or
`sources.allowed_networks` allows them; refused addresses are never connected
to and the refusal reads the same whatever listens there; a task resumed under
stricter rules is refused at its (re)connect and ends with 15.

Callbacks and webhooks: NAT64/6to4 forms are refused when given, and a URL
stored under other settings is checked again at every attempt (IP literals
included, which the HTTP client connects to without asking a resolver): a
refused attempt is a failed delivery with a clear error, never a connection.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon import Daemon
from live_servers import SilentServer, closed_port
from receivers import Receiver

pytestmark = [pytest.mark.timeout(120)]

STRICT_SOURCES = {"STREAMGUARD_SOURCES__ALLOW_PRIVATE": "false", "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "3",
                  "STREAMGUARD_LIVE__OPEN_TIMEOUT": "1", "STREAMGUARD_LIVE__READ_TIMEOUT": "1",
                  "STREAMGUARD_DELIVERY__RETRY_BASE_SECONDS": "0.2", "STREAMGUARD_DELIVERY__RETRY_MAX_SECONDS": "0.5"}
ENVELOPE_KEYS = {"success", "error", "timestamp", "path"}


@pytest.fixture(scope="module")
def strict(test_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """Sources and deliveries with the default rules: public addresses only."""
    with Daemon(tmp_path_factory.mktemp("addr-strict"), test_bundle, STRICT_SOURCES) as d:
        yield d


def private_source_urls(port: int) -> list[str]:
    return [f"rtmp://127.0.0.1:{port}/live/x", f"rtmp://localhost:{port}/live/x", f"rtsp://[::1]:{port}/x",
            f"rtmp://[64:ff9b::7f00:1]:{port}/live/x",  # NAT64 of 127.0.0.1
            f"rtmp://[2002:7f00:1::]:{port}/live/x",  # 6to4 of 127.0.0.1
            f"rtmp://[::ffff:127.0.0.1]:{port}/live/x", f"rtmp://10.0.0.1:{port}/live/x",
            f"rtsp://192.168.1.20:{port}/cam", f"rtmp://100.64.0.1:{port}/live/x",
            f"http://169.254.169.254:{port}/live.m3u8", f"rtsp://[fd00::1]:{port}/x", f"rtmp://0.0.0.0:{port}/x"]


def assert_source_refused(reply) -> str:
    assert reply.status == 422, reply.body
    assert set(reply.body) == ENVELOPE_KEYS and reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body
    message = reply.error["message"]
    assert "sources.allow_private" in message and "sources.allowed_networks" in message, message
    assert reply.error["details"]["field"] == "url", reply.error
    return message


def test_private_source_urls_are_refused_without_a_connection(strict: Daemon) -> None:
    key = strict.create_key("addr-sources")
    closed = closed_port()
    with SilentServer() as silent:
        for url in private_source_urls(silent.port):
            listening = assert_source_refused(strict.call("POST", "/v1/streams", {"url": url}, key=key))
            # the same words whether or not anything listens there: no port scanner
            nothing = assert_source_refused(strict.call("POST", "/v1/streams",
                                                        {"url": url.replace(str(silent.port), str(closed))}, key=key))
            assert listening == nothing, (listening, nothing)
        time.sleep(0.5)
        assert silent.accepted == 0, "a refused source address was connected to"
    listed = strict.call("GET", "/v1/streams", key=key)
    assert listed.status == 200 and listed.data["total"] == 0, listed.body


def test_refusal_names_the_resolved_address(strict: Daemon) -> None:
    key = strict.create_key("addr-named")
    reply = strict.call("POST", "/v1/streams", {"url": "rtmp://localhost/live/x"}, key=key)
    assert_source_refused(reply)
    assert reply.error["details"]["address"] in ("127.0.0.1", "::1"), reply.error
    reply = strict.call("POST", "/v1/streams", {"url": "rtmp://[64:ff9b::a00:1]/live/x"}, key=key)
    assert "10.0.0.1" in assert_source_refused(reply)


@pytest.mark.parametrize("url,status,needle", [
    ("rtmp://a..b/live/x", 422, "cannot be resolved"),  # IDNA refuses an empty label
    ("rtmp://[::1/live/x", 422, "no host"),  # unclosed bracket
    ("rtmp:///live/x", 422, "no host"),
])
def test_unusable_source_hosts_are_refused_not_500(strict: Daemon, url: str, status: int, needle: str) -> None:
    key = strict.create_key("addr-unusable")
    reply = strict.call("POST", "/v1/streams", {"url": url}, key=key)
    assert reply.status == status and needle in reply.error["message"], reply.body
    reply = strict.call("PUT", "/v1/project/webhook", {"url": url.replace("rtmp", "http"), "events": []}, key=key)
    assert reply.status == 400 and reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body


def test_allowed_networks_admit_a_private_network(test_bundle: Path, tmp_path: Path) -> None:
    env = {**STRICT_SOURCES, "STREAMGUARD_SOURCES__ALLOWED_NETWORKS": '["127.0.0.0/8"]'}
    with Daemon(tmp_path / "d", test_bundle, env) as d, SilentServer() as silent:
        key = d.create_key("addr-allowed")
        assert_source_refused(d.call("POST", "/v1/streams", {"url": f"rtmp://10.0.0.1:{silent.port}/x"}, key=key))
        reply = d.call("POST", "/v1/streams", {"url": silent.url("rtmp", "/live/x")}, key=key)
        assert reply.status == 200, reply.body
        task_id = reply.body["data"]["task_id"]
        d.wait_for(lambda: silent.accepted >= 1, 10, "the allowed source to be connected to")
        assert d.call("POST", f"/v1/streams/{task_id}/stop", key=key).status == 200


def test_invalid_allowed_network_is_a_config_error(cli) -> None:
    res = cli("serve", "--port", "0", env={"STREAMGUARD_SOURCES__ALLOWED_NETWORKS": '["10.0.0.0/33"]'}, timeout=30)
    assert res.returncode != 0 and "sources.allowed_networks" in res.stderr, res.stderr


def test_every_reconnect_is_checked(test_bundle: Path, tmp_path: Path) -> None:
    """A task started while loopback was allowed, resumed by a daemon that
    refuses it: its connect is refused (no connection), it ends with 15 at the
    no-data deadline and says which setting allows it."""
    data = tmp_path / "d"
    with SilentServer() as silent:
        first = Daemon(data, test_bundle, {**STRICT_SOURCES, "STREAMGUARD_SOURCES__ALLOW_PRIVATE": "true"}).start()
        try:
            key = first.create_key("addr-resume")
            reply = first.call("POST", "/v1/streams", {"url": silent.url("rtmp", "/live/x")}, key=key)
            assert reply.status == 200, reply.body
            task_id = reply.body["data"]["task_id"]
            first.wait_for(lambda: silent.accepted >= 1, 10, "the first connection")
        finally:
            first.kill()  # the task stays "running" in the store and is resumed
        accepted = silent.accepted
        with Daemon(data, test_bundle, STRICT_SOURCES) as second:
            task = second.wait_stopped(task_id, key, 20)
            assert task["status"] == 15, task
            assert "sources.allow_private" in task["message"], task
            metrics = second.call("GET", "/metrics").body.decode()
            assert 'streamguard_source_reconnects_total{reason="address_refused"}' in metrics
        assert silent.accepted == accepted, "the refused source was connected to"


# --------------------------------------------------------------------------- callbacks and webhooks


@pytest.mark.parametrize("url", ["http://[64:ff9b::7f00:1]/hook", "http://[64:ff9b::a00:1]:8080/hook",
                                 "http://[2002:7f00:1::]/hook", "http://[2002:c0a8:101::1]/hook",
                                 "http://[::ffff:10.0.0.1]/hook", "https://[ff02::1]/hook"])
def test_translated_private_callback_addresses_are_refused(strict: Daemon, url: str) -> None:
    key = strict.create_key("addr-callback")
    for reply in (strict.call("PUT", "/v1/project/webhook", {"url": url, "events": []}, key=key),
                  strict.call("POST", "/v1/streams", {"url": "rtmp://93.184.216.34/live/x", "callback_url": url},
                              key=key)):
        assert reply.status == 400 and reply.error["code"] == "STREAMGUARD_INPUT_INVALID", reply.body
        assert "private" in reply.error["message"] and "delivery.allow_private" in reply.error["message"], reply.body


def test_public_translated_callback_addresses_pass(strict: Daemon) -> None:
    """NAT64 and 6to4 of a public IPv4 address are public (an IPv6-only node reaches the IPv4 internet so)."""
    key = strict.create_key("addr-public")
    for url in ("http://[64:ff9b::5db8:d822]/hook", "http://[2002:5db8:d822::1]/hook"):
        reply = strict.call("PUT", "/v1/project/webhook", {"url": url, "events": ["categorization.failed"]}, key=key)
        assert reply.status == 200, reply.body


def test_stored_urls_are_checked_again_before_each_attempt(test_bundle: Path, tmp_path: Path) -> None:
    """Callback and webhook URLs accepted while private addresses were allowed
    are refused at send time once they are not: IP literals (which the HTTP
    client connects to without a resolver) and names alike. Each refusal is a
    failed attempt with the reason in the deliveries API; nothing connects."""
    data = tmp_path / "d"
    hooks = {"literal": "http://127.0.0.1:{p}/hook", "v6": "http://[::1]:{p}/hook",
             "nat64": "http://[64:ff9b::7f00:1]:{p}/hook", "name": "http://localhost:{p}/hook"}
    with Receiver() as rx, SilentServer() as silent:
        permissive = Daemon(data, test_bundle, {**STRICT_SOURCES, "STREAMGUARD_SOURCES__ALLOW_PRIVATE": "true",
                                                "STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true"}).start()
        try:
            keys = {name: permissive.create_key(f"addr-stored-{name}") for name in hooks}
            for name, url in hooks.items():
                reply = permissive.call("PUT", "/v1/project/webhook",
                                        {"url": url.format(p=rx.port), "events": ["stream.stopped"]}, key=keys[name])
                assert reply.status == 200, reply.body
            reply = permissive.call("POST", "/v1/streams", {"url": silent.url("rtmp", "/live/cb"),
                                                            "callback_url": rx.url("/cb")}, key=keys["literal"])
            assert reply.status == 200, reply.body
            resumed = reply.body["data"]["task_id"]
            rx.wait_for(lambda: rx.events() == ["stream.started"], 10, "stream.started to the callback")
        finally:
            permissive.kill()
        connections = rx.connections
        strict = Daemon(data, test_bundle, {**STRICT_SOURCES, "STREAMGUARD_SOURCES__ALLOW_PRIVATE": "true"})
        with strict:
            tasks = {"literal": resumed}
            for name in ("v6", "nat64", "name"):
                reply = strict.call("POST", "/v1/streams", {"url": silent.url("rtmp", f"/live/{name}")},
                                    key=keys[name])
                assert reply.status == 200, reply.body
                tasks[name] = reply.body["data"]["task_id"]
            for name, task_id in tasks.items():
                assert strict.call("POST", f"/v1/streams/{task_id}/stop", key=keys[name]).status == 200

            def refused_attempts(name: str) -> list[dict]:
                # pending, or failed once the (short) attempts ran out
                items = strict.call("GET", "/v1/deliveries?pageSize=100", key=keys[name]).data["items"]
                return [x for x in items if x["attempts"] >= 1 and x["lastError"]]

            for name in hooks:
                got = strict.wait_for(lambda n=name: (lambda xs: xs if len(xs) >= (2 if n == "literal" else 1)
                                                      else None)(refused_attempts(n)), 15, f"refused {name}")
                for item in got:
                    assert "refused" in item["lastError"] and "delivery.allow_private" in item["lastError"], item
                    assert item["lastStatusCode"] is None, item
            assert strict.call("GET", "/readyz").status == 200  # the worker goes on
        assert rx.connections == connections and rx.events() == ["stream.started"], \
            "a refused delivery address was connected to"
