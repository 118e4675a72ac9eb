"""HLS output (CONTRACT §5): per task/job a `master.m3u8`, `thumbnail.jpg` and
one folder per rendition with `playlist.m3u8` and `segment_NNN.ts`.

The `source` rendition is a remux: packets are copied into one MPEG-TS file
per moderation segment, so HLS segments and moderation segments are the same
cut. The media playlist is rewritten atomically after each segment, so a live
player always sees a valid, growing playlist; `#EXT-X-ENDLIST` closes it.
"""

from __future__ import annotations

import math
from fractions import Fraction
import os
from dataclasses import dataclass
from pathlib import Path

import av

from .segmenter import Segment


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def segment_name(index: int) -> str:
    return f"segment_{index:03d}.ts"


@dataclass
class PlaylistEntry:
    index: int
    duration: float
    size: int
    discontinuity: bool = False


def _avc_codec_string(extradata: bytes | None) -> str | None:
    # avcC box: version, profile_idc, constraint flags, level_idc
    if extradata and len(extradata) >= 4 and extradata[0] == 1:
        return f"avc1.{extradata[1]:02x}{extradata[2]:02x}{extradata[3]:02x}"
    return None


def codecs_attribute(video: av.video.stream.VideoStream, audio: av.audio.stream.AudioStream | None) -> str | None:
    if video.codec_context.name != "h264":
        return None
    vcodec = _avc_codec_string(video.codec_context.extradata)
    if vcodec is None:
        return None
    if audio is None:
        return vcodec
    if audio.codec_context.name == "aac":
        return f"{vcodec},mp4a.40.2"
    return None


class SourceRendition:
    """Remuxes the input's packets into per-segment MPEG-TS files."""

    name = "source"

    def __init__(self, task_dir: Path, segment_seconds: int, next_index: int = 0) -> None:
        self.dir = task_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_seconds = segment_seconds
        self.entries: list[PlaylistEntry] = []
        self._out: av.container.OutputContainer | None = None
        self._map: dict[int, av.stream.Stream] = {}
        self._next = next_index
        self._discontinuity = False
        self.video_in: av.video.stream.VideoStream | None = None
        self.audio_in: av.audio.stream.AudioStream | None = None
        self.width = self.height = 0
        if next_index:
            self.entries = self._load_entries(next_index)

    def _load_entries(self, next_index: int) -> list[PlaylistEntry]:
        """A resumed task keeps the segments it had stored (those before
        next_index); cut-but-unstored ones are cut again."""
        path = self.dir / "playlist.m3u8"
        if not path.exists():
            return []
        entries, duration, disc = [], 0.0, False
        for line in path.read_text().splitlines():
            if line.startswith("#EXTINF:"):
                duration = float(line[8:].split(",")[0])
            elif line == "#EXT-X-DISCONTINUITY":
                disc = True
            elif line.startswith("segment_") and line.endswith(".ts"):
                index = int(line[8:-3])
                seg = self.dir / line
                if index < next_index and seg.exists():
                    entries.append(PlaylistEntry(index, duration, seg.stat().st_size, disc))
                disc = False
        return entries

    def bind(self, video: av.video.stream.VideoStream, audio: av.audio.stream.AudioStream | None, *,
             discontinuity: bool = False) -> None:
        """Take packets from these input streams from now on (a new connection);
        the next segment is marked as a discontinuity when the source changed."""
        self.video_in, self.audio_in = video, audio
        self.width, self.height = video.codec_context.width, video.codec_context.height
        self._discontinuity = discontinuity

    def _open_segment(self) -> None:
        self._out = av.open(str(self.dir / segment_name(self._next)), mode="w", format="mpegts")
        self._map = {}
        for stream in (self.video_in, self.audio_in):
            if stream is not None:
                self._map[stream.index] = self._out.add_stream_from_template(stream)

    def write(self, packet: av.Packet, *, copy: bool = False) -> None:
        """Mux one packet. Muxing rescales the packet and takes its data, so a
        packet someone still holds (the sampler, for a later lazy decode) must
        be muxed as a copy."""
        if self._out is None:
            self._open_segment()
        assert self._out is not None
        out_stream = self._map[packet.stream.index]
        if copy:
            dup = av.Packet(packet)
            dup.pts, dup.dts, dup.duration = packet.pts, packet.dts, packet.duration
            dup.time_base, dup.is_keyframe = packet.time_base, packet.is_keyframe
            packet = dup
        packet.stream = out_stream
        self._out.mux(packet)

    def close_segment(self, segment: Segment) -> None:
        if self._out is None:
            return
        self._out.close()
        self._out = None
        self._next = segment.index + 1
        path = self.dir / segment_name(segment.index)
        self.entries.append(PlaylistEntry(segment.index, segment.duration, path.stat().st_size,
                                          self._discontinuity))
        self._discontinuity = False
        self.write_playlist(ended=False)

    def abort(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except av.error.FFmpegError:
                pass
            self._out = None

    def peak_bandwidth(self) -> int:
        rates = [e.size * 8 / e.duration for e in self.entries if e.duration > 0]
        return int(max(rates)) if rates else 0

    def write_playlist(self, *, ended: bool) -> None:
        longest = max((e.duration for e in self.entries), default=0.0)
        target = max(self.segment_seconds, math.ceil(longest))
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}",
                 f"#EXT-X-MEDIA-SEQUENCE:{self.entries[0].index if self.entries else 0}",
                 "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS"]
        for e in self.entries:
            if e.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += [f"#EXTINF:{e.duration:.3f},", segment_name(e.index)]
        if ended:
            lines.append("#EXT-X-ENDLIST")
        atomic_write(self.dir / "playlist.m3u8", "\n".join(lines) + "\n")


def write_master(task_dir: Path, renditions: list[SourceRendition], codecs: str | None) -> None:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for r in renditions:
        bandwidth = r.peak_bandwidth() or 1_000_000  # estimate until a segment is measured
        attrs = [f"BANDWIDTH={bandwidth}", f"RESOLUTION={r.width}x{r.height}"]
        if codecs:
            attrs.append(f'CODECS="{codecs}"')
        lines += [f"#EXT-X-STREAM-INF:{','.join(attrs)}", f"{r.name}/playlist.m3u8"]
    atomic_write(task_dir / "master.m3u8", "\n".join(lines) + "\n")


def write_thumbnail(frame: av.VideoFrame, path: Path, max_width: int = 640) -> None:
    """JPEG of a decoded frame, scaled in swscale to at most max_width."""
    w, h = frame.width, frame.height
    if w > max_width:
        w, h = max_width, max(2, round(h * max_width / w / 2) * 2)
    small = frame.reformat(width=w, height=h, format="yuvj420p")
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"qmin": "2", "qmax": "6"}
    data = b"".join(bytes(p) for p in ctx.encode(small)) + b"".join(bytes(p) for p in ctx.encode(None))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
