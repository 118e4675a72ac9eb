"""HLS output (CONTRACT §5): per task/job a `master.m3u8`, `thumbnail.jpg` and
one folder per rendition with `playlist.m3u8` and `segment_NNN.ts`.

The `source` rendition is a remux: packets are copied into one MPEG-TS file
per moderation segment, so HLS segments and moderation segments are the same
cut. The media playlist is rewritten atomically after each segment, so a live
player always sees a valid, growing playlist; `#EXT-X-ENDLIST` closes it.

`HlsRendition` holds what every rendition shares (entries, live window,
resume from its playlist, `playlist.m3u8`, master attributes); the encoded
rungs (media/ladder.py) extend it like `SourceRendition` does.

A live task that runs for weeks keeps a sliding window (`LiveMedia`): the
playlist lists only the newest media, from a bounded deque, with
`#EXT-X-MEDIA-SEQUENCE` and `#EXT-X-DISCONTINUITY-SEQUENCE` counting what slid
out, so a player's numbering stays stable; media retention
(media/retention.py) deletes the files that left the window.

The remux repairs what MPEG-TS refuses: a decode timestamp that does not
increase (a looping publisher repeats one at each loop point) is moved to one
tick after the last, and a presentation timestamp before its decode timestamp
is moved up to it; each repair is counted (`repairs`). A packet the muxer still
refuses is dropped and counted; the segment goes on.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol

import av

from .segmenter import Segment


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


TS_HZ = 90000  # MPEG-TS timestamps are 90 kHz ticks
TS_TIME_BASE = Fraction(1, TS_HZ)

REPAIR_DTS = "dts"  # non-increasing decode timestamp moved forward
REPAIR_PTS = "pts"  # presentation timestamp before the decode timestamp moved up
REPAIR_DROPPED = "dropped"  # packet the muxer refused, left out of the segment


def segment_name(index: int) -> str:
    return f"segment_{index:03d}.ts"


@dataclass
class PlaylistEntry:
    index: int
    duration: float
    size: int
    discontinuity: bool = False
    closed_at: float = 0.0  # wall clock (time.time()) when the file was complete
    independent: bool = True  # starts with a keyframe


class Publisher(Protocol):
    """Where a live task's files go once written (media/storage.MediaMirror
    on an S3 node): told of each closed file, and of each playlist with the
    text just written, in the order they were written."""

    def file_written(self, path: Path) -> None: ...

    def text_written(self, path: Path, text: str) -> None: ...


@dataclass(frozen=True)
class LiveMedia:
    """How a live rendition bounds its disk: the playlist lists at most
    `window_seconds` of media and nothing written more than `max_age_seconds`
    ago (retention deletes files after that, so the playlist never names a
    deleted one); `may_write()` is asked before each new segment file (false
    while free disk is below the floor: the records go on, the media pauses).
    `publish`: the task's publisher (None: served from the local files)."""

    window_seconds: float
    max_age_seconds: float
    may_write: Callable[[], bool] = lambda: True
    publish: Publisher | None = None


def _tag_int(line: str, tag: str) -> int | None:
    return int(line[len(tag):]) if line.startswith(tag) and line[len(tag):].strip().isdigit() else None


def _avc_codec_string(extradata: bytes | None) -> str | None:
    # avcC box: version, profile_idc, constraint flags, level_idc
    if extradata and len(extradata) >= 4 and extradata[0] == 1:
        return f"avc1.{extradata[1]:02x}{extradata[2]:02x}{extradata[3]:02x}"
    return None


def avc_codec_from_annexb(data: bytes) -> str | None:
    """avc1.PPCCLL from the first SPS of an Annex B access unit (what libx264
    writes in-band for MPEG-TS, where it has no avcC extradata)."""
    pos = data.find(b"\x00\x00\x01")
    while 0 <= pos <= len(data) - 7:
        nal = data[pos + 3]
        if nal & 0x1F == 7:  # sequence parameter set: profile_idc, constraint flags, level_idc
            return f"avc1.{data[pos + 4]:02x}{data[pos + 5]:02x}{data[pos + 6]:02x}"
        pos = data.find(b"\x00\x00\x01", pos + 3)
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


class HlsRendition:
    """One rendition folder: its segment files' playlist entries, the live
    window over them, and `playlist.m3u8`. Subclasses write the files
    (SourceRendition remuxes, ladder.EncodedRendition encodes) and call
    `_segment_written` / `_segment_skipped` as each segment closes."""

    name = ""

    def __init__(self, task_dir: Path, segment_seconds: int, next_index: int = 0,
                 live: LiveMedia | None = None) -> None:
        self.dir = task_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_seconds = segment_seconds
        self.live = live
        # The listed segments: bounded by the window when live (never a list
        # that grows for the life of the task).
        self.entries: deque[PlaylistEntry] = deque()
        self.media_sequence = 0  # sequence number of entries[0]
        self.discontinuity_sequence = 0  # discontinuities that slid out of the window
        self._listed_seconds = 0.0
        self._listed_bytes = 0
        self._target = segment_seconds  # TARGETDURATION never shrinks during a playlist's life
        self._skipping = False  # the open segment is not written (disk below the floor)
        self._next = next_index
        self._discontinuity = False
        self._independent = True
        # Master playlist attributes (0 / None: not known, left out)
        self.width = self.height = 0
        self.codecs: str | None = None
        self.frame_rate: Fraction | None = None
        self.nominal_bandwidth = 1_000_000  # BANDWIDTH until a segment is measured
        if next_index:
            self._load_entries(next_index)

    def _load_entries(self, next_index: int) -> None:
        """A resumed task keeps the segments it had stored (those before
        next_index; cut-but-unstored ones are cut again) and the sequence
        numbers of its windowed playlist. Only the newest run of segments whose
        files still exist is kept, so sequence numbers stay tied to positions."""
        path = self.dir / "playlist.m3u8"
        if not path.exists():
            # Taken over from another node (its playlist is in the shared media
            # store, not here): the sequence numbers go on from the segment
            # indexes, never back to 0 under a player that read the old one.
            self.media_sequence = next_index
            self._discontinuity = True
            return
        first_seq = first_disc = 0
        listed: list[PlaylistEntry] = []
        duration, disc = 0.0, False
        for line in path.read_text().splitlines():
            if (n := _tag_int(line, "#EXT-X-MEDIA-SEQUENCE:")) is not None:
                first_seq = n
            elif (n := _tag_int(line, "#EXT-X-DISCONTINUITY-SEQUENCE:")) is not None:
                first_disc = n
            elif (n := _tag_int(line, "#EXT-X-TARGETDURATION:")) is not None:
                self._target = max(self._target, n)
            elif line.startswith("#EXTINF:"):
                duration = float(line[8:].split(",")[0])
            elif line == "#EXT-X-DISCONTINUITY":
                disc = True
            elif line.startswith("segment_") and line.endswith(".ts"):
                listed.append(PlaylistEntry(int(line[8:-3]), duration, 0, disc))
                disc = False
        start, end = 0, 0  # listed[start:end]: the run that is kept
        for pos, entry in enumerate(listed):
            if entry.index >= next_index:
                break
            try:
                st = (self.dir / segment_name(entry.index)).stat()
            except FileNotFoundError:
                start = pos + 1  # a gap: only what follows it keeps consecutive numbers
                continue
            entry.size, entry.closed_at = st.st_size, st.st_mtime
            end = pos + 1
        keep, dropped = listed[start:end], listed[:start]
        self.media_sequence = first_seq + len(dropped)
        self.discontinuity_sequence = first_disc + sum(e.discontinuity for e in dropped)
        for entry in keep:
            self._append(entry)
        self._slide(time.time())

    def _append(self, entry: PlaylistEntry) -> None:
        self.entries.append(entry)
        self._listed_seconds += entry.duration
        self._listed_bytes += entry.size
        self._target = max(self._target, math.ceil(entry.duration))

    def _slide(self, now: float) -> None:
        """Drop the oldest entries past the window (by media length) or past
        the retention age; the newest entry always stays listed."""
        if self.live is None:
            return
        window = min(self.live.window_seconds, self.live.max_age_seconds)
        while len(self.entries) > 1 and (self._listed_seconds > window
                                         or now - self.entries[0].closed_at > self.live.max_age_seconds):
            gone = self.entries.popleft()
            self._listed_seconds -= gone.duration
            self._listed_bytes -= gone.size
            self.media_sequence += 1
            self.discontinuity_sequence += gone.discontinuity

    def mark_discontinuity(self) -> None:
        """The open segment follows a timestamp jump (encoder restart, spliced
        input): its playlist entry gets #EXT-X-DISCONTINUITY."""
        self._discontinuity = True

    def mark_dependent(self) -> None:
        """The open segment starts without a keyframe (a cut forced by the
        segment cap): it needs the one before it to decode."""
        self._independent = False

    def _may_write(self) -> bool:
        """Asked once per segment, when its first packet arrives."""
        if self.live is None or self.live.may_write():
            return True
        self._skipping = True
        return False

    def _segment_written(self, segment: Segment, size: int) -> None:
        """The open segment's file is complete: list it (published first,
        when live media is published) and rewrite the playlist."""
        if self.live is not None and self.live.publish is not None:
            self.live.publish.file_written(self.dir / segment_name(segment.index))
        self._next = segment.index + 1
        self._append(PlaylistEntry(segment.index, segment.duration, size,
                                   self._discontinuity, time.time(), self._independent))
        self._discontinuity = False
        self._independent = True
        self._slide(time.time())
        self.write_playlist(ended=False)

    def _segment_skipped(self, segment: Segment) -> None:
        """The segment was not written (disk below the floor): the next
        written one follows a gap."""
        self._skipping = False
        self._next = segment.index + 1
        self._discontinuity = True

    @property
    def has_playlist(self) -> bool:
        return (self.dir / "playlist.m3u8").exists()

    def peak_bandwidth(self) -> int:
        """Peak segment bit rate over the listed segments (0: none measured).
        A short last segment (a cut at the end) is not a peak of the stream."""
        full = [e for e in self.entries if e.duration >= self.segment_seconds / 2] or list(self.entries)
        rates = [e.size * 8 / e.duration for e in full if e.duration > 0]
        return math.ceil(max(rates)) if rates else 0

    def average_bandwidth(self) -> int:
        return math.ceil(self._listed_bytes * 8 / self._listed_seconds) if self._listed_seconds > 0 else 0

    def variant_attributes(self) -> list[str]:
        """EXT-X-STREAM-INF attributes: measured rates once a segment is
        listed (the nominal one before); what is not known is left out."""
        peak = self.peak_bandwidth()
        attrs = [f"BANDWIDTH={peak or self.nominal_bandwidth}"]
        if peak:
            attrs.append(f"AVERAGE-BANDWIDTH={min(peak, self.average_bandwidth())}")
        if self.width > 0 and self.height > 0:
            attrs.append(f"RESOLUTION={self.width}x{self.height}")
        if self.codecs:
            attrs.append(f'CODECS="{self.codecs}"')
        if self.frame_rate:
            attrs.append(f"FRAME-RATE={float(self.frame_rate):.3f}")
        return attrs


    def write_playlist(self, *, ended: bool) -> None:
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{self._target}",
                 f"#EXT-X-MEDIA-SEQUENCE:{self.media_sequence}"]
        if self.live is None:
            lines.append("#EXT-X-PLAYLIST-TYPE:EVENT")  # only ever appended to
        else:  # a sliding window (no PLAYLIST-TYPE: EVENT forbids removing segments)
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{self.discontinuity_sequence}")
        if all(e.independent for e in self.entries):
            lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
        for e in self.entries:
            if e.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += [f"#EXTINF:{e.duration:.3f},", segment_name(e.index)]
        if ended:
            lines.append("#EXT-X-ENDLIST")
        text = "\n".join(lines) + "\n"
        atomic_write(self.dir / "playlist.m3u8", text)
        if self.live is not None and self.live.publish is not None:
            self.live.publish.text_written(self.dir / "playlist.m3u8", text)



class SourceRendition(HlsRendition):
    """Remuxes the input's packets into per-segment MPEG-TS files."""

    name = "source"

    def __init__(self, task_dir: Path, segment_seconds: int, next_index: int = 0,
                 live: LiveMedia | None = None) -> None:
        super().__init__(task_dir, segment_seconds, next_index, live)
        self._out: av.container.OutputContainer | None = None
        self._map: dict[int, av.stream.Stream] = {}
        # per input stream index: (slot, time-base numerator x 90 kHz, denominator)
        self._ts_scale: dict[int, tuple[int, int, int]] = {}
        self._last_dts: list[int | None] = [None, None]  # per slot (video, audio), 90 kHz
        self.repairs: dict[str, int] = {REPAIR_DTS: 0, REPAIR_PTS: 0, REPAIR_DROPPED: 0}
        self.video_in: av.video.stream.VideoStream | None = None
        self.audio_in: av.audio.stream.AudioStream | None = None

    def bind(self, video: av.video.stream.VideoStream, audio: av.audio.stream.AudioStream | None, *,
             discontinuity: bool = False) -> None:
        """Take packets from these input streams from now on (a new connection);
        the next segment is marked as a discontinuity when the source changed."""
        self.video_in, self.audio_in = video, audio
        self.width, self.height = video.codec_context.width, video.codec_context.height
        self.codecs = codecs_attribute(video, audio)
        self.frame_rate = video.average_rate or video.guessed_rate
        self._discontinuity = self._discontinuity or discontinuity
        self._last_dts = [None, None]  # a new connection starts a new run of timestamps
        self._ts_scale = {}
        for slot, stream in enumerate((video, audio)):
            if stream is not None:
                tb = stream.time_base
                self._ts_scale[stream.index] = (slot, tb.numerator * TS_HZ, tb.denominator)

    def _open_segment(self) -> None:
        self._out = av.open(str(self.dir / segment_name(self._next)), mode="w", format="mpegts")
        self._map = {}
        for stream in (self.video_in, self.audio_in):
            if stream is not None:
                self._map[stream.index] = self._out.add_stream_from_template(stream)

    def write(self, packet: av.Packet, *, copy: bool = False) -> None:
        """Mux one packet, repairing its timestamps for MPEG-TS (see the module
        doc). Muxing takes the packet's data and rescales it, so a packet
        someone still holds (the sampler, for a later lazy decode) must be
        muxed as a copy."""
        if self._out is None:
            if self._skipping or not self._may_write():
                return
            self._open_segment()
        assert self._out is not None
        index = packet.stream.index
        out_stream = self._map[index]
        pts, dts, duration = packet.pts, packet.dts, packet.duration
        if copy:
            dup = av.Packet(packet)
            dup.pts, dup.dts, dup.duration = pts, dts, duration
            dup.time_base, dup.is_keyframe = packet.time_base, packet.is_keyframe
            packet = dup
        slot, num, den = self._ts_scale[index]
        if dts is None:
            dts = pts
        # in 90 kHz ticks, rounded to nearest as FFmpeg's rescale does
        dts90 = (2 * dts * num + den) // (2 * den)
        last = self._last_dts[slot]
        if last is not None and dts90 <= last or pts < dts:
            dts90 = self._repair(packet, pts, dts90, duration, last, num, den)
        packet.stream = out_stream
        try:
            self._out.mux(packet)
        except av.error.FFmpegError as exc:
            if isinstance(exc, OSError):  # the output cannot be written: the task's failure, not the packet's
                raise
            self.repairs[REPAIR_DROPPED] += 1
            return
        self._last_dts[slot] = dts90

    def _repair(self, packet: av.Packet, pts: int, dts90: int, duration: int, last: int | None,
                num: int, den: int) -> int:
        """Give the packet 90 kHz timestamps MPEG-TS accepts: a decode
        timestamp after the last one, a presentation timestamp not before it."""
        pts90 = (2 * pts * num + den) // (2 * den)
        if last is not None and dts90 <= last:
            dts90 = last + 1
            pts90 = max(pts90, dts90)
            self.repairs[REPAIR_DTS] += 1
        else:
            pts90 = dts90
            self.repairs[REPAIR_PTS] += 1
        packet.time_base = TS_TIME_BASE
        packet.pts, packet.dts = pts90, dts90
        if duration:
            packet.duration = (2 * duration * num + den) // (2 * den)
        return dts90

    def close_segment(self, segment: Segment) -> None:
        if self._skipping:  # not written: the next written segment follows a gap
            self._segment_skipped(segment)
            return
        if self._out is None:
            return
        self._out.close()
        self._out = None
        self._segment_written(segment, (self.dir / segment_name(segment.index)).stat().st_size)

    def abort(self) -> None:
        close_quietly(self._out)
        self._out = None


def close_quietly(out: av.container.OutputContainer | None) -> None:
    """Close an output being abandoned: what it fails to flush is lost with it."""
    if out is not None:
        try:
            out.close()
        except av.error.FFmpegError:
            pass


def master_playlist(renditions: list[HlsRendition]) -> str | None:
    """The master playlist over the renditions that have a playlist to point
    at, lowest bandwidth first; None while none has (a task that never got
    video gets no master). Attributes not known (no dimensions from the
    source) are left out, never guessed."""
    ready = [r for r in renditions if r.has_playlist]
    if not ready:
        return None
    lines = ["#EXTM3U", "#EXT-X-VERSION:3"]
    if all(e.independent for r in ready for e in r.entries):
        lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
    variants = sorted(((r.variant_attributes(), r.name) for r in ready),
                      key=lambda v: int(v[0][0].split("=")[1]))
    for attrs, name in variants:
        lines += [f"#EXT-X-STREAM-INF:{','.join(attrs)}", f"{name}/playlist.m3u8"]
    return "\n".join(lines) + "\n"


def write_master(task_dir: Path, renditions: list[HlsRendition], written: str | None = None,
                 publish: Publisher | None = None) -> str | None:
    """Write `master.m3u8` when there is one and it differs from `written`
    (what the caller wrote last), and publish it; returns what is on disk now."""
    text = master_playlist(renditions)
    if text is not None and text != written:
        atomic_write(task_dir / "master.m3u8", text)
        if publish is not None:
            publish.text_written(task_dir / "master.m3u8", text)
    return text or written


# A live task's alert frames (services/alerts.py), beside its renditions.
ALERTS_DIR = "alerts"


def still(frame: av.VideoFrame, max_width: int = 640) -> av.VideoFrame:
    """A decoded frame scaled in swscale to at most max_width, ready for JPEG
    (yuvj420p): the whole picture, not the model's crop."""
    w, h = frame.width, frame.height
    if w > max_width:
        w, h = max_width, max(2, round(h * max_width / w / 2) * 2)
    return frame.reformat(width=w, height=h, format="yuvj420p")


def write_jpeg(small: av.VideoFrame, path: Path) -> None:
    """JPEG of a `still`, written atomically (a reader never sees half a file)."""
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = small.width, small.height, "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"qmin": "2", "qmax": "6"}
    data = b"".join(bytes(p) for p in ctx.encode(small)) + b"".join(bytes(p) for p in ctx.encode(None))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_thumbnail(frame: av.VideoFrame, path: Path, max_width: int = 640, publish: Publisher | None = None) -> None:
    """JPEG of a decoded frame, scaled in swscale to at most max_width (and published)."""
    write_jpeg(still(frame, max_width), path)
    if publish is not None:
        publish.file_written(path)
