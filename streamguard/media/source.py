"""Media sources: open a file or URL with PyAV under open/read timeouts and
yield its video (and first audio) packets on one continuous timeline.

Timeline: packets are rebased so the first video keyframe sits at
TIMELINE_OFFSET seconds. Downstream code reads timeline seconds as
`pts * time_base - TIMELINE_OFFSET`. The offset keeps the earliest B-frame
decode timestamps and audio priming non-negative, which MPEG-TS needs (the same
reason ffmpeg's own muxers start at 1.4 s).
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
        self._base: dict[int, int] = {}  # stream index -> ticks subtracted
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

    def _rebase(self, packet: av.Packet, t0: Fraction) -> None:
        idx = packet.stream.index
        base = self._base.get(idx)
        if base is None:
            tb = packet.stream.time_base
            base = self._base[idx] = round((t0 - TIMELINE_OFFSET - self.timeline_start) / tb)
        if packet.pts is not None:
            packet.pts -= base
        if packet.dts is not None:
            packet.dts -= base

    def packets(self) -> Iterator[av.Packet]:
        """Packets from the first video keyframe on; earlier ones cannot be
        decoded or cut, so they are dropped. Sets `read_error` and stops when
        the input fails mid-way (a timeout or corrupt container)."""
        assert self.container is not None and self.video is not None
        streams = [self.video] + ([self.audio] if self.audio is not None else [])
        t0: Fraction | None = None
        audio_start = 0  # first audio pts (stream ticks) at or after t0
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
            if packet.stream is not self.video and packet.pts < audio_start:
                continue  # audio from before the first keyframe has no segment to go to
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

