"""Inputs with glitches still give one moderated record per segment (CONTRACT §3):
timestamp jumps are absorbed into one continuous timeline (HLS gets
#EXT-X-DISCONTINUITY there), non-increasing decode timestamps are repaired for
the remux, and a segment without a keyframe to cut at is cut at the cap.

Units (segmenter, remux, source) on PyAV packets and files; end to end through
the real `streamguard scan` CLI with the test model; the HLS checked with
ffprobe and ffmpeg."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import pytest

from streamguard.media.hls import REPAIR_DROPPED, REPAIR_DTS, REPAIR_PTS, SourceRendition, write_master
from streamguard.media.segmenter import CUT_CAP, CUT_JUMP, CUT_KEYFRAME, Segment, Segmenter, cap_seconds
from streamguard.media.source import BACKWARD_JUMP, TIMELINE_OFFSET, MediaSource, SourceOptions
from streamguard.pipeline.segments import PipelineOptions, SegmentPipeline
from videos import make_video

FPS = 25
FRAME = 1 / FPS
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"


# --------------------------------------------------------------------------- helpers


def seg_data(record: dict) -> dict:
    body = record["data"]
    assert body["status"] == 0, body
    return body["data"]


def assert_tiles(datas: list[dict], duration: float) -> None:
    assert [d["segment_index"] for d in datas] == list(range(len(datas)))
    assert datas[0]["start_time"] == "0.000"
    for a, b in zip(datas, datas[1:]):
        assert a["end_time"] == b["start_time"], (a, b)
    assert abs(float(datas[-1]["end_time"]) - duration) <= FRAME + 1e-6, datas[-1]


def span(d: dict) -> float:
    return float(d["end_time"]) - float(d["start_time"])


def shifted_ts(src: Path, dst: Path, offset: float) -> Path:
    """Remux `src` to MPEG-TS with every timestamp moved by `offset` seconds."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mpegts") as out:
        streams = list(inp.streams.video) + list(inp.streams.audio)
        outs = {s.index: out.add_stream_from_template(s) for s in streams}
        for p in inp.demux(streams):
            if p.size == 0:
                continue
            ticks = round(offset / p.time_base)
            p.pts = None if p.pts is None else p.pts + ticks
            p.dts = None if p.dts is None else p.dts + ticks
            p.stream = outs[p.stream.index]
            out.mux(p)
    return dst


def hls_plays(master: Path, duration: float) -> None:
    """ffprobe reads the whole rendition and ffmpeg decodes it without an error."""
    probe = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                            str(master)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert abs(float(probe.stdout.strip()) - duration) <= 0.2, (probe.stdout, duration)
    decode = subprocess.run([FFMPEG, "-v", "error", "-i", str(master), "-f", "null", "-"],
                            capture_output=True, text=True, timeout=60)
    assert decode.returncode == 0 and decode.stderr.strip() == "", decode.stderr


def packet(pts: int, *, key: bool = False, dts: int | None = None) -> av.Packet:
    p = av.Packet(b"\0")
    p.pts = pts
    p.dts = pts if dts is None else dts
    p.is_keyframe = key
    return p


# --------------------------------------------------------------------------- segmenter


def ticks(seconds: float) -> int:
    """Timeline seconds -> ticks of a 1/25 time base (the source adds TIMELINE_OFFSET)."""
    return round((Fraction(seconds).limit_denominator(1000) + TIMELINE_OFFSET) * FPS)


def test_cap_is_three_segments_or_ten_seconds_more():
    assert [cap_seconds(s) for s in (1, 2, 5, 6, 10, 60)] == [11, 12, 15, 18, 30, 180]


def test_segmenter_cuts_a_segment_without_keyframes_at_the_cap():
    seg = Segmenter(2, Fraction(1, FPS))
    closed = []
    for i in range(40 * FPS):  # 40 s, one keyframe at 0 and one at 30 s
        c = seg.feed(packet(ticks(i / FPS), key=i in (0, 30 * FPS)), True, 1)
        if c is not None:
            closed.append(c)
    closed.append(seg.finish())
    assert [(float(c.start), float(c.end), c.cut) for c in closed] == [
        (0.0, 12.0, CUT_CAP), (12.0, 24.0, CUT_CAP), (24.0, 30.0, CUT_KEYFRAME), (30.0, 40.0, "end")]
    assert closed[0].note == "cut without a keyframe after 12.0 s"
    assert closed[2].note is None


def test_segmenter_cuts_at_the_first_keyframe_after_a_jump():
    seg = Segmenter(5, Fraction(1, FPS))
    closed = []
    for i in range(12 * FPS):  # keyframes every 2 s; the source reports a jump at 6.5 s
        if i == round(6.5 * FPS):
            seg.discontinuity()
        c = seg.feed(packet(ticks(i / FPS), key=i % (2 * FPS) == 0), True, 1)
        if c is not None:
            closed.append(c)
    assert [(float(c.start), float(c.end), c.cut) for c in closed] == [
        (0.0, 6.0, CUT_KEYFRAME), (6.0, 8.0, CUT_JUMP), (8.0, 10.0, CUT_KEYFRAME)]
    assert closed[1].note == "cut at a timestamp jump"


# --------------------------------------------------------------------------- remux repair


def test_remux_repairs_non_increasing_dts_and_keeps_every_packet(tmp_path):
    src = make_video(tmp_path / "in.ts", seconds=2, bframes=0)
    with av.open(str(src)) as inp:
        video, audio = inp.streams.video[0], inp.streams.audio[0]
        packets = [p for p in inp.demux(video, audio) if p.size]
        rendition = SourceRendition(tmp_path / "out", 2)
        rendition.bind(video, audio)
        last: dict[str, int] = {}
        seen = {"audio": 0, "video": 0}
        for p in packets:
            kind = p.stream.type
            seen[kind] += 1
            if (kind, seen[kind]) == ("audio", 10):  # a looping publisher's repeated audio timestamp
                p.dts = p.pts = last[kind]
            if (kind, seen[kind]) == ("video", 20):  # a video timestamp that steps back
                p.dts = p.pts = last[kind] - 1
            last[kind] = p.dts
            rendition.write(p)
        rendition.close_segment(Segment(0, Fraction(0), Fraction(2)))
    assert rendition.repairs == {REPAIR_DTS: 2, REPAIR_PTS: 0, REPAIR_DROPPED: 0}
    with av.open(str(tmp_path / "out" / "source" / "segment_000.ts")) as out:
        got = [p for p in out.demux() if p.size]
        assert len(got) == len(packets)  # fixed up, nothing dropped
        for stream in out.streams:
            dts = [p.dts for p in got if p.stream is stream]
            assert all(a < b for a, b in zip(dts, dts[1:])), stream


def test_no_master_playlist_before_a_rendition_has_one(tmp_path):
    """A task that never got video gets no master (and no empty media playlist)."""
    pipe = SegmentPipeline(PipelineOptions(), tmp_path / "task", None, lambda closed: None)
    pipe.close()
    assert not (tmp_path / "task" / "master.m3u8").exists()
    assert not (tmp_path / "task" / "source" / "playlist.m3u8").exists()
    # dimensions the source did not give are left out, never written as 0x0
    rendition = SourceRendition(tmp_path / "task", 2)
    rendition.write_playlist(ended=False)
    assert write_master(tmp_path / "task", [rendition], None) is not None
    master = (tmp_path / "task" / "master.m3u8").read_text()
    assert "RESOLUTION" not in master and "source/playlist.m3u8" in master


# --------------------------------------------------------------------------- source: timestamp jumps


@pytest.mark.parametrize("offset_b", [0.0, 1007.0])
def test_source_absorbs_a_timestamp_jump_into_one_timeline(tmp_path, offset_b):
    a = shifted_ts(make_video(tmp_path / "a.mp4", seconds=7, gop=FPS), tmp_path / "a.ts", 0)
    b = shifted_ts(make_video(tmp_path / "b.mp4", seconds=4, gop=FPS), tmp_path / "b.ts", offset_b)
    cat = tmp_path / "cat.ts"
    cat.write_bytes(a.read_bytes() + b.read_bytes())
    source = MediaSource(str(cat), SourceOptions())
    source.open()
    seen: dict[str, list[float]] = {"video": [], "audio": []}
    try:
        for p in source.packets():
            seen[p.stream.type].append(float(p.dts * p.time_base - TIMELINE_OFFSET))
    finally:
        source.close()
    assert source.jumps == 1
    for kind, dts in seen.items():  # audio may overlap by its A/V offset: the remux repairs that
        steps = [b - a for a, b in zip(dts, dts[1:])]
        assert -BACKWARD_JUMP < min(steps) and max(steps) < 0.1, (kind, min(steps), max(steps))
    video = seen["video"]
    assert abs((video[-1] - video[0]) - (11 * FPS - 1) * FRAME) < 1e-3  # 11 s of frames, no gap, no overlap


def test_a_gap_in_the_audio_alone_is_kept_not_taken_for_a_jump(tmp_path):
    src = make_video(tmp_path / "v.mp4", seconds=20, gop=FPS)
    gapped = tmp_path / "gap.ts"
    with av.open(str(src)) as inp, av.open(str(gapped), "w", format="mpegts") as out:
        v, a = inp.streams.video[0], inp.streams.audio[0]
        outs = {v.index: out.add_stream_from_template(v), a.index: out.add_stream_from_template(a)}
        for p in inp.demux(v, a):
            if p.size and not (p.stream is a and 4 <= p.pts * a.time_base < 16):  # 12 s without audio
                p.stream = outs[p.stream.index]
                out.mux(p)
    source = MediaSource(str(gapped), SourceOptions())
    source.open()
    audio = []
    try:
        for p in source.packets():
            if p.stream.type == "audio":
                audio.append(float(p.pts * p.time_base - TIMELINE_OFFSET))
    finally:
        source.close()
    assert source.jumps == 0
    resumed = next(t for t in audio if t > 4)
    assert abs(resumed - 16) < 0.05, resumed  # still in sync with the video


# --------------------------------------------------------------------------- end to end: scan


def _scan(cli, video: Path, tmp_path: Path, test_bundle: Path, seg: int) -> list[dict]:
    res = cli("scan", video, "--moderate", "--model", test_bundle, "--segment-seconds", seg,
              "--out", tmp_path / "hls", "--data-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.records


def test_concatenated_ts_whose_second_half_restarts_its_timestamps(cli, test_bundle, tmp_path):
    """`cat a.ts b.ts`: b restarts at 0 (7 s back). The second half is moderated
    (b is all red), the timeline continues at 7 s, the playlist has a discontinuity."""
    a = shifted_ts(make_video(tmp_path / "a.mp4", seconds=7, gop=FPS), tmp_path / "a.ts", 0)
    b = shifted_ts(make_video(tmp_path / "b.mp4", seconds=4, gop=FPS, red=((0, 4),)), tmp_path / "b.ts", 0)
    cat = tmp_path / "cat.ts"
    cat.write_bytes(a.read_bytes() + b.read_bytes())
    records = _scan(cli, cat, tmp_path, test_bundle, 2)
    datas = [seg_data(r) for r in records]
    assert_tiles(datas, 11.0)
    assert [(d["start_time"], d["end_time"]) for d in datas] == [
        ("0.000", "2.000"), ("2.000", "4.000"), ("4.000", "6.000"), ("6.000", "7.000"), ("7.000", "8.000"),
        ("8.000", "10.000"), ("10.000", "11.000")]
    assert records[3]["data"]["message"] == "segment processed (cut at a timestamp jump)"
    for d in datas:
        cm = d["content_moderation"]
        assert cm["frames_processed"] == round(span(d)), d
        assert cm["has_unsafe_content"] is (float(d["start_time"]) >= 7), d
    playlist = (tmp_path / "hls" / "source" / "playlist.m3u8").read_text().splitlines()
    assert playlist.count("#EXT-X-DISCONTINUITY") == 1
    assert playlist[playlist.index("#EXT-X-DISCONTINUITY") + 2] == "segment_004.ts"
    hls_plays(tmp_path / "hls" / "master.m3u8", 11.0)


def test_forward_jump_of_1000_seconds_makes_no_huge_segment(cli, test_bundle, tmp_path):
    a = shifted_ts(make_video(tmp_path / "a.mp4", seconds=6, gop=FPS), tmp_path / "a.ts", 0)
    b = shifted_ts(make_video(tmp_path / "b.mp4", seconds=4, gop=FPS), tmp_path / "b.ts", 1006)
    cat = tmp_path / "cat.ts"
    cat.write_bytes(a.read_bytes() + b.read_bytes())
    records = _scan(cli, cat, tmp_path, test_bundle, 2)
    datas = [seg_data(r) for r in records]
    assert_tiles(datas, 10.0)
    assert max(span(d) for d in datas) <= 2.0 + 1e-6
    assert all(d["content_moderation"]["frames_processed"] == round(span(d)) for d in datas)
    playlist = (tmp_path / "hls" / "source" / "playlist.m3u8").read_text()
    assert "#EXT-X-TARGETDURATION:2\n" in playlist and playlist.count("#EXT-X-DISCONTINUITY") == 1
    hls_plays(tmp_path / "hls" / "master.m3u8", 10.0)


def _assert_capped_and_moderated(records: list[dict], seg: int, duration: float) -> list[dict]:
    datas = [seg_data(r) for r in records]
    assert_tiles(datas, duration)
    cap = cap_seconds(seg)
    for r, d in zip(records, datas):
        assert span(d) <= cap + FRAME + 1e-6, d
        capped = abs(span(d) - cap) < 1e-6
        assert r["data"]["message"] == (f"segment processed (cut without a keyframe after {cap}.0 s)"
                                        if capped else "segment processed"), (r["data"]["message"], d)
        assert d["content_moderation"]["frames_processed"] == round(span(d)), d  # moderated to the end
    return datas


def test_20_second_gop_is_cut_at_the_cap_and_every_segment_moderated(cli, test_bundle, tmp_path):
    video = make_video(tmp_path / "gop20.mp4", seconds=36, gop=20 * FPS, red=((13, 15), (25, 27)), audio=True)
    records = _scan(cli, video, tmp_path, test_bundle, 2)
    datas = _assert_capped_and_moderated(records, 2, 36.0)
    assert [(d["start_time"], d["end_time"]) for d in datas] == [
        ("0.000", "12.000"), ("12.000", "20.000"), ("20.000", "32.000"), ("32.000", "36.000")]
    flagged = [float(f["time"]) for d in datas for f in d["content_moderation"]["flagged_frames"]]
    assert flagged == [13.0, 14.0, 25.0, 26.0]  # red right after a cut without keyframe is seen
    playlist = (tmp_path / "hls" / "source" / "playlist.m3u8").read_text()
    assert "#EXT-X-TARGETDURATION:12\n" in playlist
    assert "#EXT-X-INDEPENDENT-SEGMENTS" not in playlist  # segments 1 and 3 start mid-GOP
    hls_plays(tmp_path / "hls" / "master.m3u8", 36.0)


def test_intra_refresh_stream_produces_moderated_records(cli, test_bundle, tmp_path):
    """x264 intra refresh: one IDR, then never a keyframe."""
    video = tmp_path / "ir.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s=320x240:r={FPS}:d=26",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "1000", "-bf", "0",
                    "-x264-params", "intra-refresh=1", "-pix_fmt", "yuv420p", str(video)], check=True, timeout=60)
    with av.open(str(video)) as c:
        assert sum(p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size) == 1
    records = _scan(cli, video, tmp_path, test_bundle, 2)
    datas = _assert_capped_and_moderated(records, 2, 26.0)
    assert len(datas) == 3
    hls_plays(tmp_path / "hls" / "master.m3u8", 26.0)
