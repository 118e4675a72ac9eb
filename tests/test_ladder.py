"""The encoded HLS ladder (CONTRACT §5, issue 10 items 5 and 8): `streamguard
scan --renditions source,360p,...` on generated inputs, checked with ffprobe
and hls.js; the geometry rules (portrait, never upscale); a live task with an
encoded rendition. Short inputs and x264 ultrafast keep this file's wall time
low on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402
from daemon import Daemon  # noqa: E402
from test_hlsjs import _report_findings, _summary, chromium, hlsjs, play_in_hlsjs  # noqa: E402,F401
from videos import make_video  # noqa: E402

from streamguard.media.ladder import PRESETS, fit, plan_ladder  # noqa: E402
from streamguard.media.source import MediaSource, SourceOptions  # noqa: E402
from streamguard.pipeline.segments import PipelineOptions, ingest  # noqa: E402

SEG = 2
SECONDS = 6
FPS = 25
LADDER = ["source", "360p", "480p", "720p", "1080p"]
SIZES = {"source": (1920, 1080), "360p": (640, 360), "480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
TIMELINE_OFFSET = 1.4  # media/source.py: the first keyframe sits at 1.4 s in the files


def ffprobe(*args: str | Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *map(str, args)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def first_video_frame(path: Path) -> dict:
    frames = ffprobe("-select_streams", "v", "-show_frames", "-read_intervals", "%+#1",
                     "-show_entries", "frame=pts_time,pict_type,key_frame", path)["frames"]
    return frames[0]


def master_variants(text: str) -> list[tuple[dict[str, str], str]]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF:"):
            attrs = dict(re.findall(r'([A-Z-]+)=("[^"]*"|[^,]*)', line[len("#EXT-X-STREAM-INF:"):]))
            out.append(({k: v.strip('"') for k, v in attrs.items()}, lines[i + 1]))
    return out


@pytest.fixture(scope="module")
def ladder_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 6 s 1080p input scanned into the whole ladder (segments of 2 s)."""
    tmp = tmp_path_factory.mktemp("ladder")
    video = make_video(tmp / "hd.mp4", seconds=SECONDS, fps=FPS, width=1920, height=1080, gop=2 * FPS)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", str(video), "--out", str(out),
                           "--segment-seconds", str(SEG), "--renditions", ",".join(LADDER),
                           "--x264-preset", "ultrafast", "--data-dir", str(tmp / "data")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return out, records


def test_every_rung_plays_with_its_size_and_duration(ladder_scan) -> None:
    out, records = ladder_scan
    assert [r["data"]["data"]["segment_index"] for r in records] == [0, 1, 2]
    for name in LADDER:
        info = ffprobe("-show_entries", "format=duration:stream=codec_type,width,height",
                       out / name / "playlist.m3u8")
        video = [s for s in info["streams"] if s["codec_type"] == "video"]
        assert (video[0]["width"], video[0]["height"]) == SIZES[name], (name, video)
        assert any(s["codec_type"] == "audio" for s in info["streams"]), name
        assert abs(float(info["format"]["duration"]) - SECONDS) < 0.2, (name, info["format"])
    assert (out / "thumbnail.jpg").stat().st_size > 0


def test_every_rung_segment_starts_with_a_keyframe_at_the_record_times(ladder_scan) -> None:
    out, records = ladder_scan
    for record in records:
        data = record["data"]["data"]
        assert Path(data["video_url"].removeprefix("file://")).is_file(), data["video_url"]
        start = float(data["start_time"])
        for name in LADDER:
            frame = first_video_frame(out / name / f"segment_{data['segment_index']:03d}.ts")
            assert frame["key_frame"] == 1 and frame["pict_type"] == "I", (name, data, frame)
            assert abs(float(frame["pts_time"]) - TIMELINE_OFFSET - start) <= 1 / FPS, (name, data, frame)


def test_master_playlist_attributes_ordered_by_bandwidth(ladder_scan) -> None:
    out, _ = ladder_scan
    variants = master_variants((out / "master.m3u8").read_text())
    assert sorted(uri for _, uri in variants) == sorted(f"{n}/playlist.m3u8" for n in LADDER)
    bandwidths = [int(a["BANDWIDTH"]) for a, _ in variants]
    assert bandwidths == sorted(bandwidths), variants
    for attrs, uri in variants:
        name = uri.split("/")[0]
        assert attrs["RESOLUTION"] == "%dx%d" % SIZES[name], attrs
        assert 0 < int(attrs["AVERAGE-BANDWIDTH"]) <= int(attrs["BANDWIDTH"]), attrs
        assert re.fullmatch(r"avc1\.[0-9a-f]{6},mp4a\.40\.2", attrs["CODECS"]), attrs
        assert attrs["FRAME-RATE"] == "25.000", attrs
    encoded = {uri.split("/")[0]: int(a["BANDWIDTH"]) for a, uri in variants if not uri.startswith("source")}
    assert [n for n in sorted(encoded, key=encoded.get)] == ["360p", "480p", "720p", "1080p"], encoded


@pytest.mark.live
def test_ladder_master_plays_to_its_end_in_hlsjs(ladder_scan, hlsjs: Path, chromium: str, tmp_path: Path) -> None:
    out, _ = ladder_scan
    r = play_in_hlsjs(out, hlsjs, chromium, tmp_path)
    _report_findings(r)
    info = _summary(r)
    assert not r["page_errors"] and r["video_error"] is None, info
    assert not [e for e in r["errors"] if e.get("fatal")], info
    assert len(r["levels"]) == len(LADDER), info
    assert r["duration"] is not None and abs(r["duration"] - SECONDS) <= 0.5, info
    assert r["done_reason"] == "ended" and r["max_current_time"] >= SECONDS - 1, info


def test_geometry_rules() -> None:
    p360, p1080 = PRESETS["360p"], PRESETS["1080p"]
    assert fit(p360, 1920, 1080) == (640, 360)
    assert fit(p360, 720, 1280) == (202, 360)  # portrait fits the box by its height
    assert fit(p1080, 1280, 720) is None  # would upscale
    assert fit(p360, 720, 576, sar=__import__("fractions").Fraction(16, 11)) == (640, 352)  # anamorphic PAL
    assert [p.name for p, _ in plan_ladder(["720p", "1080p"], 854, 480)] == ["720p"]
    assert plan_ladder(["720p", "1080p"], 854, 480)[0][1] == (854, 480)  # smallest asked, at source size


def _ingest(path: Path, out: Path, renditions: list[str]):
    source = MediaSource(str(path), SourceOptions())
    source.open()
    try:
        return ingest(source, PipelineOptions(segment_seconds=SEG, renditions=tuple(renditions),
                                              x264_preset="ultrafast"), out, None, lambda closed: None)
    finally:
        source.close()


def test_portrait_keeps_its_aspect_in_every_rung(tmp_path: Path) -> None:
    video = make_video(tmp_path / "portrait.mp4", seconds=2, fps=FPS, width=720, height=1280)
    result = _ingest(video, tmp_path / "out", ["360p", "480p", "720p", "1080p"])
    assert result.renditions == ["360p", "480p", "720p", "1080p"] and result.error is None
    assert abs(result.duration - 2) < 0.05
    for name in result.renditions:
        stream = ffprobe("-select_streams", "v", "-show_entries", "stream=width,height",
                         tmp_path / "out" / name / "playlist.m3u8")["streams"][0]
        w, h = stream["width"], stream["height"]
        assert h == PRESETS[name].height and w % 2 == 0 and h % 2 == 0, (name, w, h)
        assert abs(w / h - 720 / 1280) < 0.01, (name, w, h)


def test_480p_input_is_not_upscaled(tmp_path: Path) -> None:
    video = make_video(tmp_path / "sd.mp4", seconds=2, fps=FPS, width=854, height=480)
    result = _ingest(video, tmp_path / "out", ["360p", "720p", "1080p"])
    assert result.renditions == ["360p"], result.renditions  # 720p and 1080p would upscale
    assert not (tmp_path / "out" / "720p").exists() and not (tmp_path / "out" / "1080p").exists()
    master = (tmp_path / "out" / "master.m3u8").read_text()
    assert [uri for _, uri in master_variants(master)] == ["360p/playlist.m3u8"]


@pytest.mark.live
@pytest.mark.timeout(90)
def test_live_task_writes_source_and_360p(tmp_path: Path, test_bundle: Path, rtmp: ls.RtmpServer,
                                          request: pytest.FixtureRequest) -> None:
    video = ls.make_test_video(tmp_path / "live.mp4", seconds=6, fps=25, width=640, height=360, gop=25,
                               red_ranges=())
    env = {"STREAMGUARD_LIVE__OPEN_TIMEOUT": "5", "STREAMGUARD_LIVE__READ_TIMEOUT": "2"}
    with ls.publishing(video, rtmp, request.node.name) as (_, url), Daemon(tmp_path / "d", test_bundle, env) as d:
        key = d.create_key("ladder-live")
        reply = d.call("POST", "/v1/streams", {"url": url, "segment_seconds": SEG,
                                                "renditions": ["source", "360p"]}, key=key)
        assert reply.status == 200, reply.body
        task_id = reply.body["data"]["task_id"]
        d.wait_for(lambda: len([r for r in d.records(task_id, key) if r["data"]["status"] == 0]) >= 3,
                   40, "three segment records")
        stop = d.call("POST", f"/v1/streams/{task_id}/stop", key=key)
        assert stop.status == 200, stop.body
        records = [r for r in d.records(task_id, key) if r["data"]["status"] == 0]
    task_dir = tmp_path / "d" / "media" / task_id
    for name in ("source", "360p"):
        info = ffprobe("-show_entries", "format=duration:stream=codec_type,width,height",
                       task_dir / name / "playlist.m3u8")
        assert (info["streams"][0]["width"], info["streams"][0]["height"]) == (640, 360), (name, info)
        assert float(info["format"]["duration"]) >= 2 * SEG - 0.5, (name, info)
        for record in records:
            index = record["data"]["data"]["segment_index"]
            assert (task_dir / name / f"segment_{index:03d}.ts").is_file(), (name, index)
    assert "360p/playlist.m3u8" in (task_dir / "master.m3u8").read_text()
