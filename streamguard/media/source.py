"""Media sources: open a file or URL with PyAV under open/read timeouts and
yield its video (and first audio) packets on one continuous timeline.

Timeline: packets are rebased so the first video keyframe sits at
TIMELINE_OFFSET seconds. Downstream code reads timeline seconds as
`pts * time_base - TIMELINE_OFFSET`. The offset keeps the earliest B-frame
decode timestamps and audio priming non-negative, which MPEG-TS needs (the same
reason ffmpeg's own muxers start at 1.4 s).

Timestamp jumps: an encoder restart, concatenated files (`cat a.ts b.ts`), a
clock that leaps or an MPEG-TS/RTMP timestamp wrap make a stream's decode
timestamps go back, or forward by more than a gap a real stream has. Such a
jump is absorbed here: every stream's offset moves so that the packet lands
one packet after the last one, and `jumps` counts it, so that everything
downstream (segmenter, sampler, remux) sees one continuous timeline. A stream
that comes back level with the others after a gap of its own (audio after
silence was not sent) has not jumped: its gap is kept. Small
steps back (a looping publisher repeats an audio timestamp) are left to the
remux, which repairs them packet by packet.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import av.error

from ..errors import MediaError, SourceTimeout
from .replay import ReplayGuard

log = logging.getLogger(__name__)

TIMELINE_OFFSET = Fraction(7, 5)  # 1.4 s
# A stream's decode timestamps never go back by more than a reordering slip in
# a healthy source; forward, anything up to FORWARD_JUMP is a real gap (a
# variable-frame-rate camera, dropped frames) and kept. FORWARD_JUMP stays
# within the segment cap's slack (segmenter.cap_seconds >= segment + 10 s), so
# a gap never makes a segment longer than the cap.
BACKWARD_JUMP = Fraction(1, 5)
FORWARD_JUMP = 10

# Text drawn as pictures (FFmpeg's tty and bintext demuxers claim .txt, .nfo,
# .ans...): a "video" stream, but not video anyone publishes, and not muxable.
TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


@dataclass(frozen=True)
class SourceOptions:
    open_timeout: float = 10.0
    read_timeout: float = 10.0
    decode_threads: int = 1


def describe_av_error(exc: BaseException) -> str:
    """A one-line, user-facing reason for a PyAV/FFmpeg failure."""
    if isinstance(exc, av.error.FileNotFoundError):
        return "no such file"
    if isinstance(exc, av.error.ExitError):
        return "timed out"
    if isinstance(exc, (av.error.InvalidDataError,)):
        return "not a readable media file (invalid data)"
    if isinstance(exc, av.error.HTTPError) or type(exc).__name__.startswith("HTTP"):
        return f"HTTP error: {exc}"
    if isinstance(exc, av.error.FFmpegError):
        return getattr(exc, "strerror", None) or str(exc)
    return str(exc) or type(exc).__name__


def _open_options(url: str) -> dict[str, str]:
    if url.startswith(("rtsp://", "rtsps://")):
        return {"rtsp_transport": "tcp"}
    # RTMP keeps FFmpeg's default probing on purpose: a shorter one joins a
    # 2 s GOP before its first keyframe often enough to see only the audio.
    return {}


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, av.error.ExitError) or "timed out" in str(exc).lower()


class _Track:
    """Rebasing state of one stream: ticks subtracted, the last decode
    timestamp yielded and the step to the next one (all in stream ticks)."""

    __slots__ = ("tb", "base", "last", "step", "back", "forward")

    def __init__(self, tb: Fraction, base: int) -> None:
        self.tb = tb
        self.base = base
        self.last: int | None = None
        self.step = 1
        self.back = max(1, round(BACKWARD_JUMP / tb))
        self.forward = max(1, round(FORWARD_JUMP / tb))


class MediaSource:
    """One input. `open()` raises MediaError with a clear reason; `packets()`
    yields timeline-rebased packets of the video and first audio stream."""

    def __init__(self, url: str, options: SourceOptions, timeline_start: Fraction = Fraction(0), *,
                 replay: ReplayGuard | None = None) -> None:
        self.url = url
        self.options = options
        # Where this connection's first keyframe lands on the task's timeline
        # (live reconnects continue where the last connection ended).
        self.timeline_start = timeline_start
        self.container: av.container.InputContainer | None = None
        self.video: av.video.stream.VideoStream | None = None
        self.audio: av.audio.stream.AudioStream | None = None
        self._tracks: dict[int, _Track] = {}  # stream index -> rebasing state
        self._shift = Fraction(0)  # seconds moved by timestamp jumps so far
        self.jumps = 0  # timestamp jumps absorbed (the pipeline marks a discontinuity at each)
        self.replay = replay
        self.read_error: str | None = None

    def open(self) -> None:
        if "://" not in self.url and not os.path.exists(self.url):
            raise MediaError(f"cannot open {self.url}: no such file")
        try:
            self.container = av.open(
                self.url, mode="r", options=_open_options(self.url),
                timeout=(self.options.open_timeout, self.options.read_timeout),
            )
        except Exception as exc:  # PyAV raises many FFmpegError subclasses
            reason = describe_av_error(exc)
            cls = SourceTimeout if is_timeout(exc) else MediaError
            raise cls(f"cannot open {self.url}: {reason}") from None
        self.video = self._pick_video()
        self.audio = next(iter(self.container.streams.audio), None)
        ctx = self.video.codec_context
        ctx.thread_count = self.options.decode_threads
        ctx.thread_type = "AUTO" if self.options.decode_threads != 1 else "SLICE"

    def _pick_video(self) -> av.video.stream.VideoStream:
        """The first stream that is real, decodable video (not a cover picture,
        not text drawn as pictures); MediaError saying why there is none."""
        assert self.container is not None
        found: list[str] = []
        for stream in self.container.streams.video:
            ctx = stream.codec_context
            if ctx is None:
                found.append("video in a codec with no decoder")
            elif ctx.name in TEXT_CODECS:
                found.append(f"text ({ctx.codec.long_name}), not video")
            elif stream.disposition & av.stream.Disposition.attached_pic:
                found.append("a cover picture")
            else:
                return stream
        others = sorted({s.type for s in self.container.streams if s.type != "video"})
        self.close()
        contents = found + others or ["nothing"]
        raise MediaError(f"{self.url} has no video stream to moderate (it contains {', '.join(contents)})")

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def _track(self, packet: av.Packet, t0: Fraction) -> _Track:
        tb = packet.stream.time_base
        base = round((t0 - TIMELINE_OFFSET - self.timeline_start - self._shift) / tb)
        track = self._tracks[packet.stream.index] = _Track(tb, base)
        return track

    def _rebase(self, packet: av.Packet, t0: Fraction) -> None:
        track = self._tracks.get(packet.stream.index) or self._track(packet, t0)
        ts = packet.dts if packet.dts is not None else packet.pts
        t = ts - track.base
        last = track.last
        if last is not None:
            delta = t - last
            if delta < -track.back or delta > track.forward and self._ahead_of_all(track, t):
                self._jump(packet, track, t - (last + track.step))
                t = ts - track.base
            elif delta > 0:
                track.step = delta
        if packet.duration:
            track.step = packet.duration
        track.last = t
        if packet.pts is not None:
            packet.pts -= track.base
        if packet.dts is not None:
            packet.dts = t

    def _ahead_of_all(self, track: _Track, t: int) -> bool:
        """Whether a stream that leapt forward also left every other stream
        behind: audio resuming after a gap in it comes back level with the
        video, and that is a gap to keep, not a jump."""
        seconds = float(t * track.tb)
        return all(seconds - float(other.last * other.tb) > FORWARD_JUMP
                   for other in self._tracks.values() if other is not track and other.last is not None)

    def _jump(self, packet: av.Packet, track: _Track, ticks: int) -> None:
        """Move every stream by the jump, so that this packet follows the last one."""
        seconds = ticks * track.tb
        self._shift += seconds
        for other in self._tracks.values():
            other.base += ticks if other is track else round(seconds / other.tb)
        self.jumps += 1
        log.warning("%s: %s timestamps jumped by %+.3f s; the timeline continues without the jump",
                    self.url, packet.stream.type, float(seconds))

    def packets(self) -> Iterator[av.Packet]:
        """Packets from the first video keyframe on; earlier ones cannot be
        decoded or cut, so they are dropped. Sets `read_error` and stops when
        the input fails mid-way (a timeout or corrupt container)."""
        assert self.container is not None and self.video is not None
        streams = [self.video] + ([self.audio] if self.audio is not None else [])
        t0: Fraction | None = None
        audio_start: int | None = None  # audio before this pts (stream ticks) precedes t0
        demux = self.container.demux(streams)
        if self.replay is not None:
            self.replay.begin()
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                self.read_error = self._only_replayed(t0)
                return
            except Exception as exc:
                self.read_error = self._only_replayed(t0) or f"reading {self.url} failed: {describe_av_error(exc)}"
                return
            if packet.size == 0 or packet.pts is None and packet.dts is None:
                continue  # demuxer flush packets
            if t0 is None:
                if not self._starts_here(packet):
                    if self.read_error is not None:
                        return
                    continue
                t0 = packet.pts * packet.stream.time_base
                if self.audio is not None:
                    audio_start = math.ceil(t0 / self.audio.time_base)
            if packet.pts is None:
                packet.pts = packet.dts
            if audio_start is not None and packet.stream is not self.video:
                if packet.pts < audio_start:
                    continue  # audio from before the first keyframe has no segment to go to
                audio_start = None  # later audio follows it, even across a timestamp jump
            if self.replay is not None and packet.stream is self.video:
                self.replay.note(packet)
            self._rebase(packet, t0)
            yield packet

    def _only_replayed(self, t0: Fraction | None) -> str | None:
        """Why a connection that ends before its start had nothing new."""
        why = self.replay.why_nothing() if self.replay is not None and t0 is None else None
        return f"reading {self.url}: {why}" if why else None

    def _starts_here(self, packet: av.Packet) -> bool:
        """Whether this connection's video starts at this packet: its first
        keyframe, past any video the task already had (ReplayGuard). Sets
        `read_error` when the connection only replays old video."""
        if self.replay is not None and (reason := self.replay.give_up(packet)) is not None:
            self.read_error = f"reading {self.url}: {reason}"
            return False
        if packet.stream is not self.video or not packet.is_keyframe or packet.pts is None:
            return False
        return self.replay is None or not self.replay.seen(packet)

