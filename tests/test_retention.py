"""Bounded disk (issue 8 items 3 and 10): the live playlist's sliding window,
media retention, the free-space floor, and /readyz.

Real files throughout: the real segment pipeline cuts real MPEG-TS segments
(several connections make discontinuities), the retention sweep deletes real
files, ffprobe plays the windowed playlists; the daemon tests run a real
`streamguard serve` (tests/daemon.py) with small settings from the environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import live_servers as ls  # noqa: E402
from daemon import Daemon  # noqa: E402
from test_hlsjs import chromium, hlsjs, play_in_hlsjs  # noqa: E402,F401  (fixtures and the player)
from streamguard.media.hls import LiveMedia, SourceRendition, segment_name  # noqa: E402
from streamguard.media.retention import DiskSpace, MediaRetention  # noqa: E402
from streamguard.media.source import MediaSource, SourceOptions  # noqa: E402
from streamguard.pipeline.segments import PipelineOptions, SegmentPipeline  # noqa: E402

SECONDS = 8  # per connection; 1 s GOPs and 1 s segments: 8 segments each


@pytest.fixture(scope="module")
def gop1_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ls.make_test_video(tmp_path_factory.mktemp("ret-video") / "v.mp4", seconds=SECONDS, fps=25,
                              width=160, height=120, gop=25, red_ranges=())


def run_connections(pipeline: SegmentPipeline, video: Path, n: int) -> list:
    """n connections to the same file, as a live source that drops and comes back."""
    for _ in range(n):
        source = MediaSource(str(video), SourceOptions(5, 5, 1), timeline_start=pipeline.timeline_end)
        source.open()
        try:
            assert pipeline.consume(source) is None
        finally:
            source.close()


def make_pipeline(task_dir: Path, live: LiveMedia, closed: list, next_index: int = 0,
                  timeline: Fraction = Fraction(0)) -> SegmentPipeline:
    return SegmentPipeline(PipelineOptions(segment_seconds=1), task_dir, None, closed.append,
                           next_index=next_index, timeline_start=timeline, live=live)


def playlist(task_dir: Path) -> tuple[dict[str, int], list[tuple[bool, str]]]:
    """Header tags and (discontinuity, file) per listed segment."""
    tags, items, disc = {}, [], False
    for line in (task_dir / "source" / "playlist.m3u8").read_text().splitlines():
        if line.startswith(("#EXT-X-MEDIA-SEQUENCE:", "#EXT-X-DISCONTINUITY-SEQUENCE:", "#EXT-X-TARGETDURATION:")):
            name, _, value = line[1:].partition(":")
            tags[name] = int(value)
        elif line == "#EXT-X-DISCONTINUITY":
            disc = True
        elif line.endswith(".ts"):
            items.append((disc, line))
            disc = False
    return tags, items


def ffprobe_duration(url: str) -> float:
    res = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return float(json.loads(res.stdout)["format"]["duration"])


def ts_files(task_dir: Path) -> set[str]:
    return {p.name for p in (task_dir / "source").glob("segment_*.ts")}


# --------------------------------------------------------------------------- the window, on real files


def test_window_slides_with_media_and_discontinuity_sequences(tmp_path: Path, gop1_video: Path) -> None:
    task = tmp_path / "tsk_window"
    live = LiveMedia(window_seconds=12, max_age_seconds=3600)
    closed: list = []
    pipe = make_pipeline(task, live, closed)
    run_connections(pipe, gop1_video, 3)  # segments 0-7, 8-15 (discontinuity), 16-23 (discontinuity)
    pipe.close()
    assert [c.segment.index for c in closed] == list(range(3 * SECONDS))

    tags, items = playlist(task)
    # 12 s of 1 s segments: 12..23; the discontinuity at 8 slid out, the one at 16 is listed
    assert [name for _, name in items] == [segment_name(i) for i in range(12, 24)]
    assert tags["EXT-X-MEDIA-SEQUENCE"] == 12
    assert tags["EXT-X-DISCONTINUITY-SEQUENCE"] == 1
    assert [name for disc, name in items if disc] == [segment_name(16)]
    assert len(pipe.rendition.entries) == 12  # bounded: the deque holds the window only
    text = (task / "source" / "playlist.m3u8").read_text()
    assert "#EXT-X-PLAYLIST-TYPE" not in text  # EVENT forbids removing segments
    assert text.rstrip().endswith("#EXT-X-ENDLIST")
    assert abs(ffprobe_duration(str(task / "source" / "playlist.m3u8")) - 12) < 0.5

    # Retention: files that slid out and are old go; every listed file stays.
    assert ts_files(task) == {segment_name(i) for i in range(24)}  # the window itself deletes nothing
    time.sleep(1.1)
    result = MediaRetention(tmp_path, 1.0, DiskSpace(tmp_path, 0)).sweep(running={task.name})
    assert result.files_deleted == 12 and result.dirs_deleted == 0
    assert ts_files(task) == {segment_name(i) for i in range(12, 24)}
    assert abs(ffprobe_duration(str(task / "source" / "playlist.m3u8")) - 12) < 0.5

    # The next sweep starts where the last one stopped and takes what slid out since.
    retention = MediaRetention(tmp_path, 1.0, DiskSpace(tmp_path, 0))
    assert retention.sweep(running={task.name}).files_deleted == 0  # nothing new slid out
    run_connections(pipe, gop1_video, 1)  # 24..31; listed 20..31
    assert retention.sweep(running={task.name}).files_deleted == 8  # 12..19 slid out (and are old)
    assert ts_files(task) == {segment_name(i) for i in range(20, 32)}


def test_resume_reads_the_windowed_playlist(tmp_path: Path, gop1_video: Path) -> None:
    task = tmp_path / "tsk_resume"
    live = LiveMedia(window_seconds=12, max_age_seconds=3600)
    closed: list = []
    pipe = make_pipeline(task, live, closed)
    run_connections(pipe, gop1_video, 3)
    before = (task / "source" / "playlist.m3u8").read_text()

    # A restarted process resumes with the same window and sequence numbers...
    again = SourceRendition(task, 1, next_index=24, live=live)
    assert (again.media_sequence, again.discontinuity_sequence) == (12, 1)
    assert [e.index for e in again.entries] == list(range(12, 24))
    again.write_playlist(ended=False)
    assert (task / "source" / "playlist.m3u8").read_text() == before

    # ...and keeps them when it goes on: 8 more segments.
    closed.clear()
    resumed = make_pipeline(task, live, closed, next_index=24, timeline=pipe.timeline_end)
    run_connections(resumed, gop1_video, 1)
    tags, items = playlist(task)
    assert [name for _, name in items] == [segment_name(i) for i in range(20, 32)]
    assert tags["EXT-X-MEDIA-SEQUENCE"] == 20
    assert tags["EXT-X-DISCONTINUITY-SEQUENCE"] == 2  # the discontinuities at 8 and 16 slid out
    resumed.close()
    assert abs(ffprobe_duration(str(task / "source" / "playlist.m3u8")) - 12) < 0.5


def test_resume_after_front_files_were_deleted(tmp_path: Path, gop1_video: Path) -> None:
    """Retention ran while the process was down and took the oldest listed
    files, one carrying a discontinuity: the numbers still match the files."""
    task = tmp_path / "tsk_gone"
    live = LiveMedia(window_seconds=12, max_age_seconds=3600)
    pipe = make_pipeline(task, live, [])
    run_connections(pipe, gop1_video, 3)  # listed 12..23, discontinuity at 16
    for i in range(12, 17):
        (task / "source" / segment_name(i)).unlink()
    again = SourceRendition(task, 1, next_index=24, live=live)
    assert [e.index for e in again.entries] == list(range(17, 24))
    assert (again.media_sequence, again.discontinuity_sequence) == (17, 2)
    # a segment whose record was never stored (index >= next_index) is cut again: not listed
    again = SourceRendition(task, 1, next_index=20, live=live)
    assert [e.index for e in again.entries] == [17, 18, 19] and again.media_sequence == 17


def test_window_is_capped_by_retention_age(tmp_path: Path, gop1_video: Path) -> None:
    """A segment older than the retention leaves the playlist even inside the
    window (a reconnect gap makes wall time outrun media time)."""
    task = tmp_path / "tsk_age"
    listed_at_cut: dict[int, list[int]] = {}
    pipe: SegmentPipeline

    def emit(closed) -> None:
        listed_at_cut[closed.segment.index] = [e.index for e in pipe.rendition.entries]

    pipe = SegmentPipeline(PipelineOptions(segment_seconds=1), task, None, emit,
                           live=LiveMedia(window_seconds=3600, max_age_seconds=2.5))
    run_connections(pipe, gop1_video, 1)
    assert listed_at_cut[7] == [6, 7]  # 2.5 s of media (the window is capped at the retention)
    time.sleep(2.6)  # the source is away; everything listed is now older than the retention
    run_connections(pipe, gop1_video, 1)
    assert listed_at_cut[8] == [8]  # by media length alone 7 would still be listed
    tags, items = playlist(task)
    assert tags["EXT-X-MEDIA-SEQUENCE"] == 14 and tags["EXT-X-DISCONTINUITY-SEQUENCE"] == 1


def test_below_the_floor_segments_go_on_but_no_media_is_written(tmp_path: Path, gop1_video: Path) -> None:
    """The store has priority over media: with free disk below the floor (a
    real measurement against a floor above it) every segment is still cut and
    handed on for its record, but no segment file is written; once space is
    back, writing resumes after a discontinuity."""
    task = tmp_path / "tsk_low"
    low = DiskSpace(tmp_path, min_free_bytes=1 << 62)
    ok = DiskSpace(tmp_path, min_free_bytes=1)
    assert low.low() and low.reason() and "min_free_bytes" in low.reason()
    disk = [low]
    closed: list = []
    pipe = make_pipeline(task, LiveMedia(3600, 3600, may_write=lambda: disk[0].ok()), closed)
    run_connections(pipe, gop1_video, 1)
    assert [c.segment.index for c in closed] == list(range(SECONDS))
    assert ts_files(task) == set()
    disk[0] = ok
    run_connections(pipe, gop1_video, 1)
    assert ts_files(task) == {segment_name(i) for i in range(8, 16)}
    tags, items = playlist(task)
    assert items[0] == (True, segment_name(8)) and tags["EXT-X-MEDIA-SEQUENCE"] == 0


def test_sweep_removes_stopped_tasks_and_evicts_oldest_first_when_low(tmp_path: Path) -> None:
    root = tmp_path / "media"
    for i, name in enumerate(["tsk_old", "tsk_mid", "tsk_new", "tsk_run"]):
        d = root / name / "source"
        d.mkdir(parents=True)
        (d / "segment_000.ts").write_bytes(b"x" * 1000)
        (d / "playlist.m3u8").write_text("#EXTM3U\n#EXTINF:1.000,\nsegment_000.ts\n")
        t = time.time() - 100 + i * 10  # written 100, 90, 80, 70 s ago
        for p in (d / "segment_000.ts", d / "playlist.m3u8", d, d.parent):
            import os
            os.utime(p, (t, t))
    # retention 95 s: only tsk_old is past it
    res = MediaRetention(root, 95, DiskSpace(tmp_path, 0)).sweep(running={"tsk_run"})
    assert res.dirs_deleted == 1 and not (root / "tsk_old").exists()
    # below the floor: stopped tasks go oldest first while still low; a running task's listed media stays
    res = MediaRetention(root, 3600, DiskSpace(tmp_path, 1 << 62)).sweep(running={"tsk_run"})
    assert res.evicted == ["tsk_mid", "tsk_new"]
    assert sorted(p.name for p in root.iterdir()) == ["tsk_run"]
    assert (root / "tsk_run" / "source" / "segment_000.ts").exists()


# --------------------------------------------------------------------------- the daemon


RET_HOURS = 0.002  # 7.2 s
ENV = {"STREAMGUARD_STORAGE__MEDIA_RETENTION_HOURS": str(RET_HOURS),
       "STREAMGUARD_STORAGE__SWEEP_INTERVAL_SECONDS": "0.5",
       "STREAMGUARD_LIVE__PLAYLIST_WINDOW_SECONDS": "4",
       "STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "10", "STREAMGUARD_LIVE__READ_TIMEOUT": "2"}


@pytest.mark.live
@pytest.mark.timeout(120)
def test_live_task_window_and_retention_in_the_daemon(tmp_path: Path, test_bundle: Path, gop1_video: Path,
                                                       rtmp: ls.RtmpServer) -> None:
    url = rtmp.url("retention")
    with ls.Publisher(gop1_video, url) as pub, Daemon(tmp_path / "d", test_bundle, ENV) as d:
        pub.start()
        key = d.create_key("ret")
        reply = d.call("POST", "/v1/streams", {"url": url, "segment_seconds": 1,
                                                "enable_content_moderation": True}, key=key)
        assert reply.status == 200, reply.body
        task_id = reply.body["data"]["task_id"]
        task_dir = d.data_dir / "media" / task_id

        def slid_and_swept():
            if not (task_dir / "source" / "playlist.m3u8").exists():
                return None
            tags, items = playlist(task_dir)
            return tags if tags["EXT-X-MEDIA-SEQUENCE"] >= 12 else None

        tags = d.wait_for(slid_and_swept, 60, "the window to slide past 12 segments")
        time.sleep(1.0)  # one more sweep
        tags, items = playlist(task_dir)
        listed = {name for _, name in items}
        on_disk = ts_files(task_dir)
        assert listed <= on_disk  # never lists a deleted segment
        assert len(items) <= 5  # 4 s of 1 s segments (+ one for a segment just over 1 s)
        # files older than 7.2 s that left the window are gone: about 7-9 segments remain of 12+
        assert segment_name(0) not in on_disk and len(on_disk) <= 11, sorted(on_disk)
        records = d.records(task_id, key)
        assert [r["data"]["status"] for r in records] == [0] * len(records) and len(records) >= 12

        assert d.call("POST", f"/v1/streams/{task_id}/stop", key=key).status == 200
        assert task_dir.exists()  # a stopped task's media stays for the retention...
        tags, items = playlist(task_dir)
        listed = sum(float(line[8:].split(",")[0]) for line in
                     (task_dir / "source" / "playlist.m3u8").read_text().splitlines() if line.startswith("#EXTINF:"))
        played = ffprobe_duration(f"{d.base}/media/{task_id}/source/playlist.m3u8")
        assert abs(played - listed) < 0.5 and 1 <= listed <= 5.5, (played, listed)
        d.wait_for(lambda: not task_dir.exists(), RET_HOURS * 3600 + 10, "the stopped task's media to go")
        assert d.call("GET", f"/v1/streams/{task_id}/records", key=key).status == 200  # ...its records stay


def test_low_disk_refuses_new_tasks_and_readyz_says_why(tmp_path: Path, test_bundle: Path) -> None:
    # A floor above the real free space: the real measurement trips it.
    d = Daemon(tmp_path / "d", test_bundle, {"STREAMGUARD_STORAGE__MIN_FREE_BYTES": str(1 << 62)})
    try:
        d.start(until="/healthz")
        ready = d.call("GET", "/readyz")
        assert ready.status == 503, ready.body
        assert ready.error["code"] == "STREAMGUARD_UNAVAILABLE"
        assert "min_free_bytes" in ready.error["message"]
        details = ready.error["details"]
        assert details["checks"] == {"model_loaded": True, "store_writable": True, "disk_free": False,
                                     "draining": False}
        assert details["disk"]["min_free_bytes"] == 1 << 62 and details["disk"]["free_bytes"] < 1 << 62
        key = d.create_key("low")
        reply = d.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1:1/live/x"}, key=key)
        assert reply.status == 503, reply.body
        assert reply.error["code"] == "STREAMGUARD_UNAVAILABLE"
        assert "free disk space" in reply.error["message"] and reply.error["details"]["reason"] == "low_disk"
        assert d.call("GET", "/healthz").status == 200
    finally:
        d.kill()


def test_broken_model_bundle_serves_and_readyz_names_the_reason(tmp_path: Path, test_bundle: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(test_bundle, broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(b"not an onnx model")
    # A moderation task left running by a process that died...
    good = Daemon(tmp_path / "d", test_bundle, {"STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "600"})
    with good:
        key = good.create_key("nomodel")
        orphan = good.call("POST", "/v1/streams", {"url": f"rtmp://127.0.0.1:{ls.closed_port()}/live/x",
                                                    "enable_content_moderation": True}, key=key)
        assert orphan.status == 200, orphan.body
        orphan_id = orphan.body["data"]["task_id"]
    # ...and a restart whose model bundle is broken.
    d = Daemon(tmp_path / "d", broken, {"STREAMGUARD_LIVE__NO_DATA_TIMEOUT": "3"})
    try:
        d.start(until="/healthz")
        view = d.call("GET", f"/v1/streams/{orphan_id}", key=key).data
        assert view["state"] == "stopped" and view["status"] == 16, view
        assert "node cannot moderate" in view["message"] and "failed to load" in view["message"]
        ready = d.call("GET", "/readyz")
        assert ready.status == 503, ready.body
        assert ready.error["details"]["checks"]["model_loaded"] is False
        assert "failed to load" in ready.error["message"] and str(broken) in ready.error["message"]
        reply = d.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1:1/live/x",
                                                "enable_content_moderation": True}, key=key)
        assert reply.status == 503 and reply.error["code"] == "STREAMGUARD_UNAVAILABLE", reply.body
        assert "failed to load" in reply.error["message"]
        # a task that needs no model still runs
        plain = d.call("POST", "/v1/streams", {"url": "rtmp://127.0.0.1:1/live/x"}, key=key)
        assert plain.status == 200, plain.body
        d.call("POST", f"/v1/streams/{plain.body['data']['task_id']}/stop", key=key)
        lines = [line for line in d.logs().splitlines() if "failed to load" in line]
        assert len(lines) == 1 and "ERROR" in lines[0], d.logs()
    finally:
        d.kill()


@pytest.mark.live
def test_windowed_playlist_plays_in_hlsjs(tmp_path: Path, gop1_video: Path, hlsjs: Path, chromium: str) -> None:
    """A slid window (MEDIA-SEQUENCE 12, DISCONTINUITY-SEQUENCE 1, a listed
    discontinuity) plays in hls.js from its first listed segment to the end."""
    task = tmp_path / "tsk_hlsjs"
    pipe = make_pipeline(task, LiveMedia(window_seconds=12, max_age_seconds=3600), [])
    run_connections(pipe, gop1_video, 3)
    pipe.close()
    r = play_in_hlsjs(task, hlsjs, chromium, tmp_path)
    info = json.dumps({k: v for k, v in r.items() if k not in ("hls_log", "_browser_log")}, default=str)[:3000]
    assert not [e for e in r["errors"] if e.get("fatal")], info
    assert r["level_details"] and r["level_details"][0]["fragments"] == 12, info
    assert sorted({f["sn"] for f in r["frags_buffered"] if f["type"] == "main"}) == list(range(12, 24)), info
    assert r["duration"] is not None and abs(r["duration"] - 12.0) <= 0.5, info
    assert r["done_reason"] == "ended", info
