"""Frame-level alerts (CONTRACT §4 `stream.alert`, issue 15) against a real
daemon, a real nginx-rtmp server with an ffmpeg publisher and a real webhook
receiver verified with `standardwebhooks`.

Two tasks read the same live stream (a 12 s loop, saturated red during 4 of
every 12 seconds): A with `alert_threshold`, B without. A's alerts arrive
signed, at its callback and the project webhook, each before the record of
the segment its frame is in, with a JPEG of the whole frame that decodes and
is red; the cooldown holds (alerts of a category at least
`alert_cooldown_seconds` apart on the timeline, every red frame within the
cooldown of an alert); B sends no alert at all."""

from __future__ import annotations

import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

import live_servers as ls
from daemon import Daemon
from receivers import Receiver

pytestmark = [pytest.mark.live, pytest.mark.timeout(180)]

ENV = {"STREAMGUARD_DELIVERY__ALLOW_PRIVATE": "true", "STREAMGUARD_LIVE__OPEN_TIMEOUT": "5",
       "STREAMGUARD_LIVE__READ_TIMEOUT": "3", "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "10"}
LOOP, RED = 12.0, (4.0, 8.0)  # the published loop; red seconds in each
SEG = 8  # segment_seconds
COOLDOWN = 10  # alert_cooldown_seconds: one alert per red stretch (12 s apart), the stretch's other frames quiet
ALERT_KEYS = {"task_id", "category", "confidence", "severity", "time", "segment_index", "frame_url"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle):
    with Daemon(tmp_path_factory.mktemp("alerts-daemon"), test_bundle, ENV) as d:
        yield d


@pytest.fixture(scope="module")
def red_loop(tmp_path_factory: pytest.TempPathFactory):
    return ls.make_test_video(tmp_path_factory.mktemp("alerts-video") / "loop.mp4", seconds=LOOP, fps=25,
                              width=320, height=240, gop=25, red_ranges=(RED,))


def red_frame_times(records: list[dict]) -> list[float]:
    """Timeline times of the frames the records flag for violence (the red ones)."""
    return sorted(float(f["time"]) for r in records if r["data"]["status"] == 0
                  for f in r["data"]["data"]["content_moderation"]["flagged_frames"]
                  if any(v["category"] == "violence" for v in f["violations"]))


def stretches(times: list[float]) -> int:
    """Red stretches among sorted red frame times (a gap of more than 2 s starts a new one)."""
    return sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 2.0)


def test_alerts_arrive_signed_before_their_segment_with_a_red_jpeg_and_honour_the_cooldown(
        daemon: Daemon, rtmp, red_loop, request) -> None:
    key = daemon.create_key("alerts")
    secret = daemon.call("GET", "/v1/project", key=key).data["webhook"]["secret"]
    with Receiver() as rx, ls.publishing(red_loop, rtmp, request.node.name) as (_, url):
        assert daemon.call("PUT", "/v1/project/webhook", {"url": rx.url("/project"), "events": []},
                           key=key).status == 200
        common = {"url": url, "enable_content_moderation": True, "segment_seconds": SEG,
                  "metadata": {"camera": "door"}}
        a = daemon.call("POST", "/v1/streams", {**common, "callback_url": rx.url("/a"), "alert_threshold": 0.5,
                                                "alert_cooldown_seconds": COOLDOWN}, key=key)
        b = daemon.call("POST", "/v1/streams", {**common, "callback_url": rx.url("/b")}, key=key)
        assert a.status == 200 and b.status == 200, (a.body, b.body)
        task_a, task_b = a.body["data"]["task_id"], b.body["data"]["task_id"]

        def two_stretches_recorded():
            times = red_frame_times(daemon.records(task_a, key))
            return times if stretches(times) >= 2 and \
                stretches(red_frame_times(daemon.records(task_b, key))) >= 2 else None

        red_times = daemon.wait_for(two_stretches_recorded, 75, "two red stretches in both tasks' records")
        for task in (task_a, task_b):
            assert daemon.call("POST", f"/v1/streams/{task}/stop", key=key).status == 200
        records = daemon.records(task_a, key)
        rx.wait_for(lambda: any(r.event == "stream.stopped" and r.path == "/a" for r in rx.snapshot()), 20,
                    "task A's stream.stopped")
        rx.wait_for(lambda: any(r.event == "stream.stopped" and r.path == "/b" for r in rx.snapshot()), 20,
                    "task B's stream.stopped")
        requests = rx.snapshot()

    verified = rx.verified(secret)  # every request, alerts included, signed with the project secret
    assert len(verified) == len(requests)
    alerts = [r for r in requests if r.event == "stream.alert"]
    # B (no alert_threshold): no alert anywhere, though its records flag the same red frames
    assert not [r for r in alerts if r.json["data"]["task_id"] != task_a], "a task without alert_threshold alerted"
    assert not [r for r in requests if r.path == "/b" and r.event == "stream.alert"]
    # A's alerts go to its callback and to the project webhook, one event each
    by_path = {p: [r for r in alerts if r.path == p] for p in ("/a", "/project")}
    assert by_path["/a"] and [r.id for r in by_path["/a"]] == [r.id for r in by_path["/project"]], by_path
    for r in by_path["/a"]:
        body = r.json
        assert body["event"] == "stream.alert" and body["eventId"] == r.id and body["metadata"] == {"camera": "door"}
        data = body["data"]
        assert set(data) == ALERT_KEYS, data
        assert data["category"] == "violence" and data["confidence"] >= 0.9 and data["severity"] == "high", data
        assert float(data["time"]) in red_times, (data, red_times)  # the alert is about a frame the record flags

    # before the segment's record: each alert reaches the callback before the record of its segment
    # (the frame is alerted on when scored; the record waits for the segment to close)
    record_arrival = {r.json["data"]["data"]["segment_index"]: r.arrived for r in requests
                      if r.path == "/a" and r.event == "stream.segment" and r.json["data"]["status"] == 0}
    ends = {r["data"]["data"]["segment_index"]: float(r["data"]["data"]["end_time"]) for r in records
            if r["data"]["status"] == 0}
    checked = 0
    for r in by_path["/a"]:
        seg, t = r.json["data"]["segment_index"], float(r.json["data"]["time"])
        assert seg in ends and float(next(x["data"]["data"]["start_time"] for x in records
                                          if x["data"]["data"] and x["data"]["data"]["segment_index"] == seg)) \
            <= t < ends[seg], (seg, t, ends)
        if ends[seg] - t >= 1.0:  # a frame at a segment's very end may be scored with it
            assert r.arrived < record_arrival[seg], (t, seg, r.arrived, record_arrival[seg])
            checked += 1
    assert checked, "no alert early enough in its segment to compare"

    # the cooldown: alert times at least COOLDOWN apart; every red frame within COOLDOWN after an alert
    alert_times = sorted(float(r.json["data"]["time"]) for r in by_path["/a"])
    assert all(b - a >= COOLDOWN for a, b in zip(alert_times, alert_times[1:])), alert_times
    for t in red_times:
        if t <= alert_times[-1] + COOLDOWN:
            assert any(0 <= t - a < COOLDOWN for a in alert_times), (t, alert_times)
    assert len(red_times) > len(alert_times) >= 2, (red_times, alert_times)

    # the JPEG: a whole frame (320x240, not the model's 224 crop), saturated red
    for r in by_path["/a"]:
        frame_url = r.json["data"]["frame_url"]
        path = urllib.parse.urlsplit(frame_url).path
        assert path.startswith(f"/media/{task_a}/alerts/") and path.endswith(".jpg"), frame_url
        got = daemon.call("GET", path)
        assert got.status == 200 and got.headers["Content-Type"] == "image/jpeg", got.status
        img = Image.open(io.BytesIO(got.body)).convert("RGB")
        assert img.size == (320, 240), img.size
        r_, g_, b_ = np.asarray(img).reshape(-1, 3).mean(axis=0)
        assert r_ >= 200 and g_ <= 55 and b_ <= 55, (r_, g_, b_)

    # the same alerts, listed for polling (task and project), in order
    listed = daemon.call("GET", f"/v1/streams/{task_a}/alerts", key=key)
    assert listed.status == 200, listed.body
    assert [i["eventId"] for i in listed.data["items"]] == [r.id for r in by_path["/a"]]
    assert listed.data["next_after"] == listed.data["items"][-1]["alert_index"]
    assert daemon.call("GET", f"/v1/streams/{task_b}/alerts", key=key).data == {"items": [], "next_after": 0}
    after = daemon.call("GET", f"/v1/alerts?after={listed.data['items'][0]['alert_index']}", key=key).data
    assert [i["eventId"] for i in after["items"]] == [r.id for r in by_path["/a"]][1:]
    # another project sees none of it
    other = daemon.create_key("alerts-other")
    assert daemon.call("GET", f"/v1/streams/{task_a}/alerts", key=other).status == 404
    assert daemon.call("GET", "/v1/alerts", key=other).data["items"] == []


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"alert_threshold": 0.5}, "alert_threshold", "needs enable_content_moderation"),
    ({"enable_content_moderation": True, "alert_threshold": 1.5}, "alert_threshold", "between 0 and 1"),
    ({"enable_content_moderation": True, "alert_threshold": 0.5, "alert_cooldown_seconds": 0},
     "alert_cooldown_seconds", "between 1 and 3600"),
    ({"enable_content_moderation": True, "alert_threshold": "high"}, "alert_threshold", "alert_threshold"),
])
def test_bad_alert_settings_are_refused_naming_the_field(daemon: Daemon, body, field, message) -> None:
    key = daemon.create_key("alerts-bad")
    reply = daemon.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1:1/live/x", **body}, key=key)
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "STREAMGUARD_INPUT_INVALID" and message in reply.error["message"], reply.body
    assert daemon.call("GET", "/v1/streams", key=key).data["total"] == 0  # nothing started, nothing stored
