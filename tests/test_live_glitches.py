"""A live source with timestamp glitches, end to end: a real `streamguard serve`
daemon reading a real nginx-rtmp stream from `ffmpeg -re -stream_loop -1 -i
f.mp4 -c copy -f flv` (tests/live_servers.py). At each loop point ffmpeg
repeats an audio decode timestamp (AAC priming of an ffmpeg-made mp4), which
MPEG-TS refuses: the remux must repair it, and no segment may lose its
moderation for it (CONTRACT §3: "a bad packet is repaired or dropped, not
fatal").

A stream whose keyframes are further apart than the segment cap (a long GOP,
intra refresh) is cut without a keyframe at max(3 x segment, segment + 10) s,
and decoding carries on across that cut."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

import live_servers as ls
from daemon import Daemon
from streamguard.media.segmenter import cap_seconds

pytestmark = [pytest.mark.live, pytest.mark.timeout(120)]

SEG = 2
LOOP = 3.0  # seconds of the looped file: 2 s of test pattern, then 1 s of saturated red
LOOP_POINTS = 3


@pytest.fixture(scope="module")
def looped_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user loops: an ffmpeg-made H.264 (B-frames, 1 s GOP) + AAC mp4, whose
    audio starts with the encoder's priming (an edit list), 2 s pattern then 1 s red."""
    path = tmp_path_factory.mktemp("loop") / "f.mp4"
    graph = ("testsrc2=s=320x240:r=25:d=2[a];color=c=red:s=320x240:r=25:d=1[b];[a][b]concat=n=2:v=1:a=0[v];"
             "sine=frequency=440:sample_rate=48000:d=3[s]")
    subprocess.run([ls.FFMPEG, "-v", "error", "-y", "-filter_complex", graph, "-map", "[v]", "-map", "[s]",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
                    "-bf", "2", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)], check=True, timeout=60)
    return path


def _metric(d: Daemon, name: str, labels: str) -> float:
    text = d.call("GET", "/metrics").body.decode()
    m = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_looping_publisher_keeps_every_segment_moderated(tmp_path: Path, test_bundle: Path, looped_file: Path,
                                                         rtmp: ls.RtmpServer) -> None:
    url = rtmp.url("looped")
    with ls.Publisher(looped_file, url) as pub, Daemon(tmp_path / "data", test_bundle) as d:
        pub.start()
        key = d.create_key("loop")
        reply = d.call("POST", "/v1/streams", {"url": url, "enable_content_moderation": True,
                                               "segment_seconds": SEG}, key=key)
        assert reply.status == 200, reply.body
        task_id = reply.data["task_id"]

        def past_loop_points():
            recs = d.records(task_id, key)
            ends = [float(r["data"]["data"]["end_time"]) for r in recs if r["data"]["data"]]
            return recs if ends and ends[-1] >= (LOOP_POINTS + 1) * LOOP else None

        d.wait_for(past_loop_points, (LOOP_POINTS + 1) * LOOP + 40, f"records past {LOOP_POINTS} loop points")
        stop = d.call("POST", f"/v1/streams/{task_id}/stop", key=key)
        assert stop.status == 200 and stop.data["status"] == 14, stop.body
        records = d.records(task_id, key)
        repaired = _metric(d, "streamguard_packets_repaired_total", 'kind="dts"')
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json",
                                d.base + f"/media/{task_id}/master.m3u8"], capture_output=True, text=True, timeout=60)
        decode = subprocess.run([ls.FFMPEG, "-v", "error", "-i", d.base + f"/media/{task_id}/master.m3u8",
                                 "-f", "null", "-"], capture_output=True, text=True, timeout=60)

    assert records[-1]["data"]["status"] == 14
    segs = records[:-1]
    assert [r["data"]["status"] for r in segs] == [0] * len(segs), [r["data"]["message"] for r in segs]
    datas = [r["data"]["data"] for r in segs]
    assert [x["segment_index"] for x in datas] == list(range(len(datas)))
    assert datas[0]["start_time"] == "0.000"
    for a, b in zip(datas, datas[1:]):
        assert a["end_time"] == b["start_time"], (a, b)
    for x in datas:  # every segment moderated: one sampled frame per second of it
        span = float(x["end_time"]) - float(x["start_time"])
        assert 0 < span <= SEG + 1.05, x
        cm = x["content_moderation"]
        assert cm is not None and abs(cm["frames_processed"] - span) <= 1.0, x
    # The red second ends every loop, right before the loop point: one flagged frame per loop.
    flagged = [float(f["time"]) for x in datas for f in x["content_moderation"]["flagged_frames"]]
    loops = float(datas[-1]["end_time"]) / LOOP
    assert len(flagged) >= int(loops) - 1 >= LOOP_POINTS - 1, (flagged, loops)
    for a, b in zip(flagged, flagged[1:]):
        assert LOOP - 0.1 <= b - a <= LOOP + 1.1, flagged
    assert repaired >= 1, "the loop points were expected to need DTS repairs"

    assert probe.returncode == 0, probe.stderr
    duration = float(json.loads(probe.stdout)["format"]["duration"])
    assert abs(duration - float(datas[-1]["end_time"])) <= 1.0, (duration, datas[-1])
    assert decode.returncode == 0 and "non monoton" not in decode.stderr.lower(), decode.stderr
    assert all(urllib.parse.urlsplit(x["video_url"]).path.endswith(f"segment_{x['segment_index']:03d}.ts")
               for x in datas)


def test_long_gop_stream_is_cut_at_the_cap_and_moderated_after_the_cut(tmp_path: Path, test_bundle: Path,
                                                                       rtmp: ls.RtmpServer) -> None:
    """A 14 s file with one keyframe, looped: keyframes 14 s apart on the wire. With
    1 s segments (cap 11 s) a segment starting at a keyframe is cut at 11 s without
    one; the red second at 12-13 s of the file lies after that cut and is flagged."""
    gop, seg = 14, 1
    cap = cap_seconds(seg)
    video = ls.make_test_video(tmp_path / "gop.mp4", seconds=gop, gop=gop * 25, red_ranges=((12.0, 13.0),))
    url = rtmp.url("longgop")
    # nginx-rtmp sends a new player no video before the next keyframe: the task may
    # reconnect a few times before it joins, so give it time to.
    env = {"STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "60"}
    with ls.Publisher(video, url) as pub, Daemon(tmp_path / "data", test_bundle, env) as d:
        pub.start()
        key = d.create_key("longgop")
        reply = d.call("POST", "/v1/streams", {"url": url, "enable_content_moderation": True,
                                               "segment_seconds": seg}, key=key)
        assert reply.status == 200, reply.body
        task_id = reply.data["task_id"]

        def capped_and_next():
            recs = d.records(task_id, key)
            i = next((i for i, r in enumerate(recs) if "without a keyframe" in r["data"]["message"]), None)
            return recs if i is not None and len(recs) > i + 1 else None

        records = d.wait_for(capped_and_next, 3 * gop + 30, "a capped segment and the one after it")
        d.call("POST", f"/v1/streams/{task_id}/stop", key=key)
    assert all(r["data"]["status"] == 0 for r in records), [r["data"]["message"] for r in records]
    datas = [r["data"]["data"] for r in records]
    for a, b in zip(datas, datas[1:]):
        assert a["end_time"] == b["start_time"], (a, b)
    i = next(i for i, r in enumerate(records) if "without a keyframe" in r["data"]["message"])
    capped, after = datas[i], datas[i + 1]
    assert records[i]["data"]["message"] == f"segment processed (cut without a keyframe after {cap}.0 s)"
    assert abs(span(capped) - cap) <= 0.05, capped
    for x in datas:
        assert span(x) <= cap + 0.05, x
        assert abs(x["content_moderation"]["frames_processed"] - span(x)) <= 1.0, x
    # the segment after the cut runs to the next keyframe (14 s into the file) and sees the red second
    assert abs(span(after) - (gop - cap)) <= 0.05, after
    flagged = [float(f["time"]) - float(after["start_time"]) for f in after["content_moderation"]["flagged_frames"]]
    assert flagged == [1.0], after


def span(x: dict) -> float:
    return float(x["end_time"]) - float(x["start_time"])
