"""Live stream tasks end to end: a real `streamguard serve` daemon (tests/daemon.py)
reading real RTMP (nginx-rtmp + ffmpeg publisher), RTSP (GStreamer) and HLS (ffmpeg)
sources on loopback (tests/live_servers.py), with the generated test model.

Covers CONTRACT §2 (live stream routes) and §3 (the per-segment record): records in
segment order with tiling times and the planted red seconds flagged; stop -> 14 and
a closed playlist; a publisher that vanishes -> reconnect, then 15 after the no-data
timeout; a URL that refuses and one that accepts and stays silent -> 15; balance
running out mid-run -> 402; SIGTERM drain -> 16 after the in-flight segment.

Short timeouts come from STREAMGUARD_* environment overrides; every wait is bounded.
Load shedding (status 16 for overload) is provoked for real in tests/test_capacity.py.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402
from daemon import Daemon  # noqa: E402

pytestmark = [
    pytest.mark.live,
    pytest.mark.timeout(150),
]

NO_DATA_TIMEOUT = 6.0  # live.no_data_timeout
READ_TIMEOUT = 2.0  # live.read_timeout
OPEN_TIMEOUT = 5.0  # live.open_timeout (RTMP probing takes ~2.7 s)
DRAIN_TIMEOUT = 10.0  # limits.drain_timeout
# A source that stops delivering video is noticed within one read timeout; the task
# must then end with 15 once `no_data_timeout` seconds have passed without video.
NO_DATA_SLACK = READ_TIMEOUT + 1.0
ENV = {
    "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": str(NO_DATA_TIMEOUT),
    "STREAMGUARD_LIVE__READ_TIMEOUT": str(READ_TIMEOUT),
    "STREAMGUARD_LIVE__OPEN_TIMEOUT": str(OPEN_TIMEOUT),
    "STREAMGUARD_LIMITS__DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
}

SEG = 2  # segment_seconds of every task here
FPS_SAMPLE = 1  # frames sampled per second (the default)
TOKENS_PER_IMAGE = 50  # ViT-B/32 geometry of the test model: 49 patches + 1
VIDEO_SECONDS, RED = 20.0, (10.0, 15.0)  # the looped test video: red during seconds 10-15
RED_SECONDS = RED[1] - RED[0]
CATEGORIES = {"nudity_explicit", "sexual_activity", "suggestive_nudity", "lingerie_underwear", "sexy_suggestive",
              "violence", "gore_graphic", "hate_symbols", "drugs_substances", "weapons", "child_safety",
              "self_harm", "harassment"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s, 25 fps, 1 s GOPs, no B-frames, saturated red during seconds 10-15, AAC audio."""
    return ls.make_test_video(tmp_path_factory.mktemp("live-video") / "red20.mp4", seconds=VIDEO_SECONDS,
                              fps=25, width=320, height=240, gop=25, red_ranges=(RED,))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path):
    """One daemon for the tests that do not stop it; each test uses its own key and project."""
    with Daemon(tmp_path_factory.mktemp("live-daemon"), test_bundle, ENV) as d:
        yield d


@pytest.fixture
def publisher(live_video: Path, rtmp: ls.RtmpServer, request: pytest.FixtureRequest):
    """A started ffmpeg publisher on its own stream key; yields (publisher, url)."""
    with ls.publishing(live_video, rtmp, request.node.name) as started:
        yield started


# --------------------------------------------------------------------------- helpers


def start_task(d: Daemon, key: str, url: str, **params) -> str:
    body = {"url": url, "enable_content_moderation": True, "segment_seconds": SEG, **params}
    reply = d.call("POST", "/v1/streams", body, key=key)
    assert reply.status == 200, reply.body
    assert reply.body["code"] == "200" and reply.body["message"] == "SUCCESS", reply.body
    assert reply.body["data"]["message"] == "stream started"
    return reply.body["data"]["task_id"]


def task_view(d: Daemon, task_id: str, key: str) -> dict:
    reply = d.call("GET", f"/v1/streams/{task_id}", key=key)
    assert reply.status == 200, reply.body
    return reply.data


def segment_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["data"]["status"] == 0]


def ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def get(d: Daemon, url_or_path: str):
    """Plain unauthenticated GET of a /media URL on this daemon (its path only: a restarted
    daemon listens on another port than the one in older records)."""
    path = urllib.parse.urlsplit(url_or_path).path if "://" in url_or_path else url_or_path
    return d.call("GET", path)


def assert_segment_record(record: dict, task_id: str) -> dict:
    """Shape of a status-0 record (CONTRACT §3); returns its data.data."""
    assert record["code"] == "200" and record["message"] == "SUCCESS" and record["task_id"] == task_id, record
    body = record["data"]
    assert body["status"] == 0 and body["message"] == "segment processed", body
    data = body["data"]
    assert data is not None, record
    assert re.fullmatch(r"\d+\.\d{3}", data["start_time"]) and re.fullmatch(r"\d+\.\d{3}", data["end_time"]), data
    assert urllib.parse.urlsplit(data["video_url"]).path == \
        f"/media/{task_id}/source/segment_{data['segment_index']:03d}.ts", data["video_url"]
    assert int(data["processing_time_ms"]) >= 0
    return data


def assert_terminal_record(record: dict, task_id: str, status: int) -> dict:
    assert record["code"] == "200" and record["task_id"] == task_id, record
    body = record["data"]
    assert body["status"] == status, body
    assert body["data"] is None and body["token"] is None, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def assert_tiling(datas: list[dict], first_index: int = 0) -> None:
    """segment_index 0,1,2..., first start 0.000, each start == previous end, each cut
    at the first keyframe at or after its segment_seconds boundary (1 s GOPs)."""
    assert [d["segment_index"] for d in datas] == list(range(first_index, first_index + len(datas))), \
        [d["segment_index"] for d in datas]
    if first_index == 0:
        assert datas[0]["start_time"] == "0.000", datas[0]
    for a, b in zip(datas, datas[1:]):
        assert a["end_time"] == b["start_time"], (a, b)
    for d in datas:
        assert float(d["end_time"]) > float(d["start_time"]), d


def assert_cut_at_boundary(data: dict) -> None:
    """A segment that closed at its cut (not at a stop or a source drop)."""
    start, end = float(data["start_time"]), float(data["end_time"])
    boundary = (math.floor(start / SEG + 1e-9) + 1) * SEG
    assert boundary - 1e-6 <= end <= boundary + 1.0 + 0.05, f"segment cut at {end}, boundary {boundary}: {data}"


def assert_moderation(data: dict) -> dict:
    """content_moderation consistent with the test model (red -> violence >= 0.9, else < 0.1)."""
    cm = data["content_moderation"]
    assert cm is not None, data
    start, end = float(data["start_time"]), float(data["end_time"])
    assert set(cm["scores"]) == CATEGORIES, cm["scores"]
    assert all(v < 0.1 for k, v in cm["scores"].items() if k != "violence"), cm["scores"]
    # fps 1: about one sampled frame per second of the segment
    assert abs(cm["frames_processed"] - (end - start) * FPS_SAMPLE) <= 1.0, (cm["frames_processed"], data)
    if cm["has_unsafe_content"]:
        assert [v["category"] for v in cm["violations"]] == ["violence"], cm
        assert cm["scores"]["violence"] >= 0.9, cm
        assert cm["flagged_frames"], cm
    else:
        assert cm["violations"] == [] and cm["flagged_frames"] == [], cm
        assert cm["scores"]["violence"] < 0.1, cm
    for f in cm["flagged_frames"]:
        assert start - 1e-3 <= float(f["time"]) <= end + 1e-3, (f, data)
        assert 0 <= f["frame_index"] < cm["frames_processed"], (f, cm)
        assert [v["category"] for v in f["violations"]] == ["violence"], f
    return cm


def assert_categorization(data: dict) -> dict:
    """categorization of a segment with no green (CONTRACT §6 rules; the test model's green is Sports)."""
    cat = data["categorization"]
    assert cat is not None, data
    assert len(cat["scores"]) == 20 and abs(sum(cat["scores"].values()) - 1) <= 1e-3, cat["scores"]
    first, rest = cat["categories"][0], cat["categories"][1:]
    assert first == {"name": cat["primary_category"], "confidence": cat["confidence"], "primary": True}, cat
    assert len(cat["categories"]) <= 6 and all(not c["primary"] and c["confidence"] >= 0.01 for c in rest), cat
    assert cat["scores"]["Sports"] < 0.2 and cat["tags"], cat
    return cat


def assert_tokens(record: dict) -> int:
    """video_tokens = frames run through the encoder x 50; input = total = video + text;
    output 0; no text: the node's shared prompt embeddings are charged to no tenant
    (issue 8 item 7). The moving test pattern never repeats, so each of its frames is
    encoded; identical red frames reuse the first one's embedding (not billed)."""
    tok = record["data"]["token"]
    cm = record["data"]["data"]["content_moderation"]
    frames = cm["frames_processed"]
    if cm["flagged_frames"]:
        assert tok["video_tokens"] % TOKENS_PER_IMAGE == 0 and tok["video_tokens"] <= frames * TOKENS_PER_IMAGE, tok
    else:
        assert tok["video_tokens"] == frames * TOKENS_PER_IMAGE, (tok, frames)
    assert tok["output"] == 0, tok
    assert tok["input"] == tok["total"] == tok["video_tokens"] + tok["text_tokens"], tok
    assert tok["text_tokens"] == 0, tok
    return tok["total"]


def complete_red_runs(datas: list[dict]) -> list[list[dict]]:
    """Runs of consecutive flagged segments with an unflagged segment on both sides."""
    runs, cur, seen_clean = [], [], False
    for d in datas:
        if d["content_moderation"]["has_unsafe_content"]:
            if seen_clean:
                cur.append(d)
        else:
            if cur:
                runs.append(cur)
                cur = []
            seen_clean = True
    return runs


def playlist_entries(text: str) -> list[tuple[float, str]]:
    lines = text.strip().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("#EXTINF:"):
            out.append((float(line[len("#EXTINF:"):].split(",")[0]), lines[i + 1]))
    return out


def reconnect_metrics(d: Daemon) -> dict[str, float]:
    reply = d.call("GET", "/metrics")
    assert reply.status == 200
    text = reply.body.decode() if isinstance(reply.body, bytes) else str(reply.body)
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^streamguard_source_reconnects_total\{reason="([^"]+)"\} ([0-9.e+]+)$', text, re.M)}


# --------------------------------------------------------------------------- 1. RTMP end to end


def test_rtmp_records_flag_red_then_stop_closes_playlist(daemon: Daemon, publisher) -> None:
    pub, url = publisher
    key = daemon.create_key("live-rtmp")
    task_id = start_task(daemon, key, url)

    # The task's timeline starts when it connects, somewhere in the publisher's loop:
    # wait until a whole red stretch (flagged segments with clean ones on both sides).
    def full_red_stretch():
        datas = [r["data"]["data"] for r in segment_records(daemon.records(task_id, key))]
        return datas if complete_red_runs(datas) else None

    daemon.wait_for(full_red_stretch, VIDEO_SECONDS + 25, "a complete red stretch in the records")
    assert task_view(daemon, task_id, key)["state"] == "running"

    t0 = time.monotonic()
    stop = daemon.call("POST", f"/v1/streams/{task_id}/stop", key=key)
    assert stop.status == 200, stop.body
    assert stop.body["success"] is True
    assert stop.data["state"] == "stopped" and stop.data["status"] == 14, stop.data
    assert time.monotonic() - t0 < READ_TIMEOUT + 3

    records = daemon.records(task_id, key)
    assert_terminal_record(records[-1], task_id, 14)
    segs = records[:-1]
    assert len(segs) >= 8 and all(r["data"]["status"] == 0 for r in segs), [r["data"]["status"] for r in segs]
    datas = [assert_segment_record(r, task_id) for r in segs]
    assert_tiling(datas)
    for d in datas[:-1]:  # the last one was cut short by the stop
        assert_cut_at_boundary(d)
    cms = [assert_moderation(d) for d in datas]

    # The planted 5 red seconds: each complete flagged run spans them and only them.
    runs = complete_red_runs(datas)
    assert runs, [cm["has_unsafe_content"] for cm in cms]
    for run in runs:
        assert 2 <= len(run) <= math.ceil(RED_SECONDS / SEG) + 1, [d["segment_index"] for d in run]
        times = [float(f["time"]) for d in run for f in d["content_moderation"]["flagged_frames"]]
        assert RED_SECONDS * FPS_SAMPLE - 1 <= len(times) <= RED_SECONDS * FPS_SAMPLE + 1, times
        assert RED_SECONDS - 2.0 <= max(times) - min(times) <= RED_SECONDS + 0.5, times
    flagged = [d for d in datas if d["content_moderation"]["has_unsafe_content"]]
    in_runs = {d["segment_index"] for run in runs for d in run}
    flags = [cm["has_unsafe_content"] for cm in cms]
    lead = next((i for i, f in enumerate(flags) if not f), len(flags))  # a red stretch cut by the start
    trail = next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))  # ... or by the stop
    edges = set(range(lead)) | set(range(len(flags) - trail, len(flags)))
    assert {d["segment_index"] for d in flagged} - in_runs <= edges, flags

    # Tokens: the prompt tokens (text) may only ride on the first record (then cached).
    totals = [assert_tokens(r) for r in segs]

    view = task_view(daemon, task_id, key)
    assert view["state"] == "stopped" and view["status"] == 14 and view["message"], view
    assert view["counters"] == {"segments": len(segs), "flagged_segments": len(flagged),
                                "tokens": sum(totals), "reconnects": 0}, view["counters"]
    assert urllib.parse.urlsplit(view["playlist_url"]).path == f"/media/{task_id}/master.m3u8", view
    assert view["stopped_at"] and view["started_at"], view

    # Media: the playlist is closed and lists exactly the recorded segments.
    pl = get(daemon, f"/media/{task_id}/source/playlist.m3u8")
    assert pl.status == 200, pl.body
    text = pl.body.decode()
    assert text.startswith("#EXTM3U") and text.rstrip().endswith("#EXT-X-ENDLIST"), text
    entries = playlist_entries(text)
    assert [name for _, name in entries] == [f"segment_{d['segment_index']:03d}.ts" for d in datas], text
    for (dur, _), d in zip(entries, datas):
        assert abs(dur - (float(d["end_time"]) - float(d["start_time"]))) <= 0.0015, (dur, d)
    for d in (datas[0], datas[len(datas) // 2], datas[-1]):
        seg = get(daemon, d["video_url"])
        assert seg.status == 200 and seg.body[:1] == b"\x47", (d["video_url"], seg.status)
    master = get(daemon, view["playlist_url"])
    assert master.status == 200 and b"source/playlist.m3u8" in master.body, master.body

    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type:format=duration", "-of", "json",
         daemon.base + f"/media/{task_id}/master.m3u8"], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    assert "video" in {s["codec_type"] for s in info["streams"]}, info
    expected = float(datas[-1]["end_time"])
    assert abs(float(info["format"]["duration"]) - expected) <= 1.0, (info["format"], expected)

    metrics = daemon.call("GET", "/metrics").body.decode()
    for name in ("streamguard_frames_decoded_total", "streamguard_frames_sampled_total",
                 "streamguard_segment_latency_seconds_count"):
        value = float(re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M).group(1))
        assert value > 0, name
    assert re.search(r"^streamguard_frames_reused_total [0-9.e+]+$", metrics, re.M)  # a moving source: maybe 0


# --------------------------------------------------------------------------- 2. reconnect, then 15


def test_publisher_vanishes_reconnects_then_no_data_ends_with_15(daemon: Daemon, publisher) -> None:
    pub, url = publisher
    key = daemon.create_key("live-reconnect")
    task_id = start_task(daemon, key, url)
    daemon.wait_for(lambda: len(segment_records(daemon.records(task_id, key))) >= 2, 20, "two records")

    pub.stop()  # SIGKILL: the publisher vanishes without unpublishing
    time.sleep(2.0)
    assert task_view(daemon, task_id, key)["state"] == "running"
    pub.start()
    before = len(segment_records(daemon.records(task_id, key)))

    def resumed():
        view = task_view(daemon, task_id, key)
        assert view["state"] == "running", view  # never ended by the short outage
        n = len(segment_records(daemon.records(task_id, key)))
        return view if view["counters"]["reconnects"] >= 1 and n >= before + 2 else None

    view = daemon.wait_for(resumed, 30, "the task to reconnect and produce records again")
    assert view["counters"]["reconnects"] >= 1, view

    records = daemon.records(task_id, key)
    assert all(r["data"]["status"] == 0 for r in records), [r["data"] for r in records]
    datas = [assert_segment_record(r, task_id) for r in records]
    assert_tiling(datas)  # one continuous timeline and numbering across the reconnect
    for d in datas:
        assert_moderation(d)

    reasons = reconnect_metrics(daemon)
    assert reasons and sum(reasons.values()) >= 1, reasons
    assert all(re.fullmatch(r"[a-z_]+", r) for r in reasons), reasons

    # The publisher goes for good: 15 once no video came for no_data_timeout.
    killed_at = time.time()
    pub.stop()
    view = daemon.wait_stopped(task_id, key, timeout=NO_DATA_TIMEOUT + 30)
    assert view["status"] == 15, view
    records = daemon.records(task_id, key)
    body = assert_terminal_record(records[-1], task_id, 15)
    assert all(r["data"]["status"] == 0 for r in records[:-1]), [r["data"]["status"] for r in records]
    assert_tiling([r["data"]["data"] for r in records[:-1]])
    assert view["message"] == body["message"]
    assert view["counters"]["segments"] == len(records) - 1, view
    pl = get(daemon, f"/media/{task_id}/source/playlist.m3u8")
    assert pl.status == 200 and pl.body.decode().rstrip().endswith("#EXT-X-ENDLIST")
    took = ts(view["stopped_at"]) - killed_at
    assert NO_DATA_TIMEOUT - 0.5 <= took <= NO_DATA_TIMEOUT + NO_DATA_SLACK, (
        f"status 15 came {took:.1f} s after the publisher vanished; no_data_timeout is {NO_DATA_TIMEOUT} s "
        f"(read_timeout {READ_TIMEOUT} s): {body['message']}")


# --------------------------------------------------------------------------- 3./4. dead sources


def test_refused_url_ends_with_15_after_the_timeout(daemon: Daemon) -> None:
    key = daemon.create_key("live-refused")
    task_id = start_task(daemon, key, f"rtmp://127.0.0.1:{ls.closed_port()}/live/x")
    view = daemon.wait_stopped(task_id, key, timeout=NO_DATA_TIMEOUT + 30)
    assert view["status"] == 15, view
    assert "refused" in view["message"].lower(), view["message"]
    assert view["counters"]["reconnects"] >= 1 and view["counters"]["segments"] == 0, view
    records = daemon.records(task_id, key)
    assert len(records) == 1, records
    assert "refused" in assert_terminal_record(records[0], task_id, 15)["message"].lower()
    took = ts(view["stopped_at"]) - ts(view["created_at"])
    assert NO_DATA_TIMEOUT - 0.5 <= took <= NO_DATA_TIMEOUT + NO_DATA_SLACK, took
    assert "refused" in reconnect_metrics(daemon), reconnect_metrics(daemon)


def test_silent_server_ends_with_15_and_daemon_stays_responsive(daemon: Daemon) -> None:
    key = daemon.create_key("live-silent")
    with ls.SilentServer() as silent:
        task_id = start_task(daemon, key, silent.url("rtmp", "/live/silent"))
        deadline = time.monotonic() + NO_DATA_TIMEOUT + 30
        slowest = 0.0
        view = None
        while time.monotonic() < deadline:
            t = time.monotonic()
            health = daemon.call("GET", "/healthz", timeout=5)
            slowest = max(slowest, time.monotonic() - t)
            assert health.status == 200, health.body
            view = task_view(daemon, task_id, key)
            if view["state"] == "stopped":
                break
            time.sleep(0.25)
        assert view is not None and view["state"] == "stopped", view
        assert silent.accepted >= 1
    assert slowest < 0.5, f"/healthz took {slowest:.2f} s while a task waited on a silent source"
    assert view["status"] == 15, view
    records = daemon.records(task_id, key)
    assert len(records) == 1, records
    assert_terminal_record(records[0], task_id, 15)
    took = ts(view["stopped_at"]) - ts(view["created_at"])
    assert NO_DATA_TIMEOUT - 0.5 <= took <= NO_DATA_TIMEOUT + NO_DATA_SLACK, (
        f"status 15 came {took:.1f} s after the start; no_data_timeout is {NO_DATA_TIMEOUT} s: {view['message']}")


def test_stop_while_source_is_silent_is_prompt(daemon: Daemon) -> None:
    """live.open_timeout / live.read_timeout bound how long a stop waits for a silent source."""
    key = daemon.create_key("live-silent-stop")
    with ls.SilentServer() as silent:
        task_id = start_task(daemon, key, silent.url("rtmp", "/live/silent"))
        daemon.wait_for(lambda: silent.accepted >= 1, 10, "the task to connect")
        time.sleep(0.5)
        t0 = time.monotonic()
        stop = daemon.call("POST", f"/v1/streams/{task_id}/stop", key=key, timeout=60)
        took = time.monotonic() - t0
    assert stop.status == 200 and stop.data["state"] == "stopped" and stop.data["status"] == 14, stop.body
    records = daemon.records(task_id, key)
    assert len(records) == 1
    assert_terminal_record(records[0], task_id, 14)
    assert took <= max(READ_TIMEOUT, OPEN_TIMEOUT) + 1.5, f"stopping a task on a silent source took {took:.1f} s"


# --------------------------------------------------------------------------- 5./6. RTSP and HLS


def test_rtsp_over_tcp_with_moderation(daemon: Daemon) -> None:
    key = daemon.create_key("live-rtsp")
    with ls.RtspServer(red_ranges=[(0.0, 4.0)], loop_seconds=8.0) as rtsp:
        task_id = start_task(daemon, key, rtsp.url)
        daemon.wait_for(lambda: len(segment_records(daemon.records(task_id, key))) >= 4, 40, "four records")
        stop = daemon.call("POST", f"/v1/streams/{task_id}/stop", key=key)
    assert stop.status == 200 and stop.data["status"] == 14, stop.body
    records = daemon.records(task_id, key)
    assert_terminal_record(records[-1], task_id, 14)
    datas = [assert_segment_record(r, task_id) for r in records[:-1]]
    assert_tiling(datas)
    cms = [assert_moderation(d) for d in datas]
    # 4 red seconds in every 8: at least one of the first 8 s of segments is flagged
    assert any(cm["has_unsafe_content"] for cm in cms), cms
    assert not all(cm["has_unsafe_content"] for cm in cms), cms
    for r in records[:-1]:
        assert_tokens(r)
    pl = get(daemon, f"/media/{task_id}/source/playlist.m3u8")
    assert pl.status == 200 and pl.body.decode().rstrip().endswith("#EXT-X-ENDLIST")


def test_hls_source(daemon: Daemon, live_video: Path) -> None:
    key = daemon.create_key("live-hls")
    with ls.HlsLiveSource(live_video) as hls:
        # with categorization and a per-category threshold (one image pass serves both analyses)
        task_id = start_task(daemon, key, hls.url, enable_categorization=True, thresholds={"weapons": 0.5})
        daemon.wait_for(lambda: len(segment_records(daemon.records(task_id, key))) >= 3, 40, "three records")
        stop = daemon.call("POST", f"/v1/streams/{task_id}/stop", key=key)
    assert stop.status == 200 and stop.data["state"] == "stopped" and stop.data["status"] == 14, stop.body
    records = daemon.records(task_id, key)
    assert_terminal_record(records[-1], task_id, 14)
    datas = [assert_segment_record(r, task_id) for r in records[:-1]]
    assert_tiling(datas)
    for d in datas:
        assert_moderation(d)
        assert_categorization(d)
    for r in records[:-1]:
        assert_tokens(r)  # categorization adds no tokens
    settings = task_view(daemon, task_id, key)["settings"]
    assert settings["enable_categorization"] is True and settings["thresholds"] == {"weapons": 0.5}, settings
    pl = get(daemon, f"/media/{task_id}/source/playlist.m3u8")
    assert pl.status == 200 and pl.body.decode().rstrip().endswith("#EXT-X-ENDLIST")


# --------------------------------------------------------------------------- 7. balance


def test_balance_runs_out_mid_run_ends_with_402(tmp_path: Path, test_bundle: Path, publisher) -> None:
    pub, url = publisher
    data_dir = tmp_path / "data"
    # A fresh data dir: the daemon encodes the prompt embeddings at start, for its cache.
    # That is the node's own work: no segment, the first included, pays for it (item 7).
    per_segment = SEG * FPS_SAMPLE * TOKENS_PER_IMAGE  # 100 tokens for a whole 2 s segment
    balance = 3 * per_segment + per_segment // 2  # three segments, then short
    with Daemon(data_dir, test_bundle, ENV) as d:
        key = d.create_key("live-balance", balance=balance)
        task_id = start_task(d, key, url)
        view = d.wait_stopped(task_id, key, timeout=40)
        records = d.records(task_id, key)
        remaining = d.cli("keys", "balance", key)
    assert view["status"] == 402, view
    body = assert_terminal_record(records[-1], task_id, 402)
    assert "balance" in body["message"].lower(), body
    paid = records[:-1]
    assert paid, "no segment was paid before the balance ran out"
    datas = [assert_segment_record(r, task_id) for r in paid]
    assert_tiling(datas)
    totals = [assert_tokens(r) for r in paid]  # text_tokens 0 from the first segment on
    charged = sum(totals)
    assert charged <= balance, (charged, balance)
    # it stopped because the next whole segment could not be paid, not earlier
    assert balance - charged < per_segment, (balance, charged, totals)
    # a whole segment costs per_segment; a red one whose frames reuse an embedding costs less
    assert len(paid) >= balance // per_segment, (len(paid), totals)
    if all(t == per_segment for t in totals):
        assert len(paid) == balance // per_segment, (len(paid), totals)
    assert view["counters"]["tokens"] == charged and view["counters"]["segments"] == len(paid), view
    assert remaining.returncode == 0, remaining.stderr
    assert int(remaining.stdout.strip().splitlines()[-1]) == balance - charged, remaining.stdout


# --------------------------------------------------------------------------- 8. SIGTERM drain


def test_sigterm_drains_running_tasks_with_16(tmp_path: Path, test_bundle: Path, live_video: Path,
                                              rtmp: ls.RtmpServer) -> None:
    data_dir = tmp_path / "data"
    urls = [rtmp.url("drain_a"), rtmp.url("drain_b")]
    pubs = [ls.Publisher(live_video, u) for u in urls]
    d = Daemon(data_dir, test_bundle, ENV)
    try:
        for p in pubs:
            p.start()
        d.start()
        key = d.create_key("live-drain")
        tasks = [start_task(d, key, u) for u in urls]
        for t in tasks:
            d.wait_for(lambda: len(segment_records(d.records(t, key))) >= 2, 20, f"two records of {t}")
        time.sleep(0.7)  # mid-segment
        t0 = time.monotonic()
        try:
            rc = d.terminate(timeout=DRAIN_TIMEOUT + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon still running {DRAIN_TIMEOUT + 20} s after SIGTERM\n{d.logs()}")
        took = time.monotonic() - t0
    finally:
        d.kill()
        for p in pubs:
            p.close()
    assert rc == 0, d.logs()
    assert took <= SEG + 1 + 5, f"drain took {took:.1f} s for {SEG} s segments"

    with Daemon(data_dir, test_bundle, ENV) as d2:
        for t in tasks:
            view = task_view(d2, t, key)
            assert view["state"] == "stopped" and view["status"] == 16, view
            assert view["message"] == "node draining", view
            records = d2.records(t, key)
            assert_terminal_record(records[-1], t, 16)
            assert records[-1]["data"]["message"] == "node draining"
            assert [r["data"]["status"] for r in records[:-1]] == [0] * (len(records) - 1), records
            datas = [assert_segment_record(r, t) for r in records[:-1]]
            assert_tiling(datas)
            # The in-flight segment was finished at its cut and stored, media included.
            last = datas[-1]
            seg = get(d2, last["video_url"])
            assert seg.status == 200, (
                f"the record before the 16 names {last['video_url']}, which does not exist "
                f"({last['start_time']}-{last['end_time']} s, "
                f"{last['content_moderation']['frames_processed']} frames): not a finished segment")
            assert last["content_moderation"]["frames_processed"] >= 1, last
            assert_cut_at_boundary(last)
            pl = get(d2, f"/media/{t}/source/playlist.m3u8")
            assert pl.status == 200
            text = pl.body.decode()
            assert text.rstrip().endswith("#EXT-X-ENDLIST"), text
            assert [n for _, n in playlist_entries(text)] == \
                [f"segment_{x['segment_index']:03d}.ts" for x in datas], text
            assert view["counters"]["segments"] == len(datas), view
