"""`streamguard scan` end to end: real files generated at run time, the real
test model, the real CLI in a subprocess."""

from __future__ import annotations

import random
import shutil
import subprocess

import av
import pytest

from videos import make_video

FRAME = 1 / 25


def seg_data(record: dict) -> dict:
    assert record["code"] == "200" and record["message"] == "SUCCESS"
    return record["data"]["data"]


def assert_tiles(records: list[dict], duration: float, segment_seconds: int) -> None:
    data = [seg_data(r) for r in records]
    assert [d["segment_index"] for d in data] == list(range(len(data)))
    assert data[0]["start_time"] == "0.000"
    for a, b in zip(data, data[1:]):
        assert a["end_time"] == b["start_time"]
    assert abs(float(data[-1]["end_time"]) - duration) <= FRAME + 1e-6
    for d in data[:-1]:  # each cut is at or after its segment_seconds boundary
        assert float(d["end_time"]) >= (int(float(d["start_time"]) // segment_seconds) + 1) * segment_seconds


def test_red_seconds_flag_exactly_their_segments(cli, red_video, test_bundle, tmp_path):
    out = tmp_path / "hls"
    res = cli("scan", red_video, "--moderate", "--model", test_bundle, "--out", out, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    records = res.records
    assert_tiles(records, 30.0, 5)
    for r in records:
        d = seg_data(r)
        start, end = float(d["start_time"]), float(d["end_time"])
        cm = d["content_moderation"]
        covers_red = start < 15 and end > 10
        assert cm["has_unsafe_content"] is covers_red, d
        assert [v["category"] for v in cm["violations"]] == (["violence"] if covers_red else [])
        assert set(cm["scores"]) == {
            "nudity_explicit", "sexual_activity", "suggestive_nudity", "lingerie_underwear", "sexy_suggestive",
            "violence", "gore_graphic", "hate_symbols", "drugs_substances", "weapons", "child_safety",
            "self_harm", "harassment"}
        assert all(v < 0.1 for k, v in cm["scores"].items() if k != "violence")
        assert (cm["scores"]["violence"] >= 0.9) is covers_red
        # fps 1: one sampled frame per whole second of the segment
        assert cm["frames_processed"] == round(end - start)
        for f in cm["flagged_frames"]:
            assert 10 <= float(f["time"]) < 15
            assert f["violations"][0]["category"] == "violence"
            assert 0 <= f["frame_index"] < cm["frames_processed"]
        flagged_times = sorted(float(f["time"]) for f in cm["flagged_frames"])
        assert flagged_times == [float(t) for t in range(10, 15) if start <= t < end]
        tok = r["data"]["token"]
        # Frames run through the encoder (CONTRACT §3): the identical red frames
        # after the first reuse its embedding (duplicate-frame reuse); the moving
        # pattern never repeats, so every other frame is encoded.
        encoded = cm["frames_processed"] - max(0, len(flagged_times) - 1)
        assert tok["video_tokens"] == encoded * 50
        assert tok["input"] == tok["total"] == tok["video_tokens"] + tok["text_tokens"]
        assert tok["output"] == 0
        assert d["video_url"].endswith(f"/source/segment_{d['segment_index']:03d}.ts")
        assert int(d["processing_time_ms"]) >= 0
    # the shared prompt embeddings (encoded by this first run, for the cache) are the
    # tool's own work, charged to no segment: no input's request carries its own text
    assert all(r["data"]["token"]["text_tokens"] == 0 for r in records)


def test_hls_output_plays_with_the_input_duration(cli, red_video, tmp_path):
    out = tmp_path / "hls"
    res = cli("scan", red_video, "--out", out, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    records = [seg_data(r) for r in res.records]
    master = (out / "master.m3u8").read_text()
    assert "source/playlist.m3u8" in master and "BANDWIDTH=" in master and "RESOLUTION=320x240" in master
    playlist = (out / "source" / "playlist.m3u8").read_text()
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert playlist.count("#EXTINF") == len(records)
    assert (out / "thumbnail.jpg").read_bytes()[:2] == b"\xff\xd8"
    # without --moderate: no analysis, no tokens
    assert all(r["content_moderation"] is None for r in records)
    assert all(r["data"]["token"]["total"] == 0 for r in res.records)

    with av.open(str(out / "master.m3u8")) as c:  # PyAV follows master -> playlist -> segments
        v = c.streams.video[0]
        pts = [f.pts * v.time_base for f in c.decode(v)]
        assert len(c.streams.audio) == 1
    assert len(pts) == 30 * 25
    assert abs(float(max(pts) - min(pts)) + FRAME - 30.0) <= FRAME

    for d in records:  # each segment file holds exactly its record's time span (±1 frame)
        seg = out / "source" / f"segment_{d['segment_index']:03d}.ts"
        with av.open(str(seg)) as c:
            v = c.streams.video[0]
            n = sum(1 for _ in c.demux(v) if _.size)
        assert abs(n * FRAME - (float(d["end_time"]) - float(d["start_time"]))) <= FRAME + 1e-6

    if shutil.which("ffprobe"):
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                str(out / "master.m3u8")], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        assert abs(float(probe.stdout.strip()) - 30.0) <= FRAME * len(records)


@pytest.mark.parametrize("gop_seconds,segment_seconds", [(3, 5), (7, 5), (0.4, 2)])
def test_gop_lengths_that_do_not_divide_the_segment(cli, tmp_path, gop_seconds, segment_seconds):
    video = make_video(tmp_path / "g.mp4", seconds=22, gop=int(gop_seconds * 25), audio=False)
    res = cli("scan", video, "--segment-seconds", segment_seconds, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert_tiles(res.records, 22.0, segment_seconds)
    keyframes = {round(k * gop_seconds, 3) for k in range(int(22 / gop_seconds) + 1)}
    for d in map(seg_data, res.records[:-1]):
        assert round(float(d["end_time"]), 3) in keyframes  # cuts only at keyframes


def test_higher_fps_samples_more_frames(cli, red_video, test_bundle, tmp_path):
    res = cli("scan", red_video, "--moderate", "--fps", "5", "--model", test_bundle, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    for d in map(seg_data, res.records):
        span = float(d["end_time"]) - float(d["start_time"])
        assert d["content_moderation"]["frames_processed"] == round(span * 5)


def test_several_inputs_share_one_run(cli, red_video, test_bundle, tmp_path):
    other = make_video(tmp_path / "calm.mp4", seconds=12, audio=False)
    res = cli("scan", red_video, other, "--moderate", "--model", test_bundle, "--out", tmp_path / "o",
              "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    by_task: dict[str, list[dict]] = {}
    for r in res.records:
        by_task.setdefault(r["task_id"], []).append(r)
    assert len(by_task) == 2
    lengths = sorted(len(v) for v in by_task.values())
    assert lengths == [3, 6]
    for task_id, recs in by_task.items():
        assert (tmp_path / "o" / task_id / "master.m3u8").is_file()
        assert [seg_data(r)["segment_index"] for r in recs] == list(range(len(recs)))
    calm = next(v for v in by_task.values() if len(v) == 3)
    assert not any(seg_data(r)["content_moderation"]["has_unsafe_content"] for r in calm)


def _corrupt_video(src, dst, lo: float, hi: float, keep: int, garble) -> None:
    """A copy of `src` whose video packets in [lo, hi) s keep their first `keep`
    bytes (length prefix and NAL header, so keyframes stay keyframes) and have
    the rest replaced by `garble(size)`."""
    shutil.copy(src, dst)
    with av.open(str(src)) as c:
        v = c.streams.video[0]
        spots = [(p.pos, p.size) for p in c.demux(v)
                 if p.pts is not None and lo <= p.pts * v.time_base < hi]
    with open(dst, "r+b") as fh:
        for pos, size in spots:
            fh.seek(pos + keep)
            fh.write(garble(size - keep))


def test_damaged_packets_cost_no_segment_its_moderation(cli, red_video, test_bundle, tmp_path):
    """Half a second of garbled packets (keyframe included) at 10 s: the frames
    that still decode are moderated; no -1."""
    corrupt = tmp_path / "corrupt.mp4"
    rnd = random.Random(7)
    _corrupt_video(red_video, corrupt, 10, 10.5, 0, lambda n: bytes(rnd.randrange(256) for _ in range(n)))
    res = cli("scan", corrupt, "--moderate", "--model", test_bundle, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert [r["data"]["status"] for r in res.records] == [0] * len(res.records), res.stdout
    datas = [seg_data(r) for r in res.records]
    assert_tiles(res.records, 30.0, 5)
    hit = next(d for d in datas if float(d["start_time"]) <= 10 < float(d["end_time"]))
    assert hit["content_moderation"]["frames_processed"] >= 1, hit
    assert any(d["content_moderation"]["has_unsafe_content"] for d in datas)  # red after the damage still flags


@pytest.mark.parametrize("moderate", [True, False])
def test_segment_without_one_decodable_frame_gets_minus_one_and_the_rest_goes_on(
        cli, red_video, test_bundle, tmp_path, moderate):
    corrupt = tmp_path / "corrupt.mp4"
    _corrupt_video(red_video, corrupt, 10, 16, 5, bytes)  # segment [10, 16): every packet's payload zeroed
    args = ["--moderate", "--model", test_bundle] if moderate else []
    res = cli("scan", corrupt, *args, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    statuses = [r["data"]["status"] for r in res.records]
    assert statuses == [0, 0, -1, 0, 0, 0], res.stdout
    bad = res.records[2]
    assert bad["data"]["data"] is None and bad["data"]["token"] is None
    assert "no decodable video" in bad["data"]["message"], bad
    assert "Traceback" not in res.stderr


def _no_traceback_error(res, needle: str) -> None:
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("streamguard: error:") and needle in lines[0], lines[0]


def test_audio_only_input(cli, tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as out:
        a = out.add_stream("aac", rate=48000)
        import numpy as np
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 48000, i * 1024
            for p in a.encode(f):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    _no_traceback_error(cli("scan", path, "--data-dir", tmp_path), "no video stream")


def test_non_video_input(cli, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 100)
    _no_traceback_error(cli("scan", path, "--data-dir", tmp_path), "not a readable media file")


@pytest.mark.parametrize("lines, needle", [(2, "not a readable media file"), (2000, "text (ASCII/ANSI art)")])
def test_text_file_is_not_video(cli, tmp_path, lines, needle):
    """FFmpeg reads a long enough .txt as "ansi" video (text drawn as pictures):
    refused at open with one line, never a crash."""
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"Lorem ipsum dolor sit amet, line {i}\n" for i in range(lines)))
    res = cli("scan", path, "--data-dir", tmp_path)
    assert res.returncode == 1, res
    _no_traceback_error(res, needle)


def test_cover_picture_is_not_video(cli, tmp_path):
    path = tmp_path / "song.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=2", "-f", "lavfi", "-i",
                    "color=red:s=64x64:d=1", "-map", "0", "-map", "1", "-c:a", "libmp3lame", "-c:v", "mjpeg",
                    "-frames:v", "1", "-disposition:v", "attached_pic", str(path)], check=True)
    _no_traceback_error(cli("scan", path, "--data-dir", tmp_path), "no video stream to moderate (it contains a "
                                                                    "cover picture, audio)")


def test_missing_file(cli, tmp_path):
    _no_traceback_error(cli("scan", tmp_path / "nope.mp4", "--data-dir", tmp_path), "no such file")


def test_truncated_mp4(cli, red_video, tmp_path):
    path = tmp_path / "trunc.mp4"
    path.write_bytes(red_video.read_bytes()[: red_video.stat().st_size // 3])
    _no_traceback_error(cli("scan", path, "--data-dir", tmp_path), "trunc.mp4")


def test_truncated_ts_gives_the_segments_it_has(cli, red_video, tmp_path):
    ts = tmp_path / "full.ts"
    with av.open(str(red_video)) as src, av.open(str(ts), "w", format="mpegts") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.size:
                p.stream = out
                dst.mux(p)
    cut = tmp_path / "cut.ts"
    cut.write_bytes(ts.read_bytes()[: ts.stat().st_size // 2])
    res = cli("scan", cut, "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    data = [seg_data(r) for r in res.records]
    assert 1 <= len(data) < 6
    assert all(a["end_time"] == b["start_time"] for a, b in zip(data, data[1:]))


def test_unreachable_url(cli, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _no_traceback_error(cli("scan", f"http://127.0.0.1:{port}/live.m3u8", "--data-dir", tmp_path), "cannot open")


def test_missing_model_is_a_clear_error(cli, red_video, tmp_path):
    _no_traceback_error(cli("scan", red_video, "--moderate", "--model", tmp_path / "nomodel",
                            "--data-dir", tmp_path), "models make-test")


@pytest.mark.parametrize("args,needle", [
    (["--fps", "0"], "--fps"), (["--fps", "31"], "--fps"), (["--segment-seconds", "61"], "--segment-seconds"),
    (["--threshold", "1.5"], "--threshold"), (["--renditions", "8k"], "--renditions"), (["--fps", "x"], "--fps"),
])
def test_out_of_range_arguments(cli, red_video, tmp_path, args, needle):
    res = cli("scan", red_video, *args, "--data-dir", tmp_path)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr
