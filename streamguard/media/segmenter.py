"""Cuts the packet stream into segments.

Rule (CONTRACT §3): a segment closes at the first video keyframe at or after
the next multiple of `segment_seconds` on the timeline. The source rendition
is a remux, so keyframes are the only possible cuts; the reported times are
the actual cut times, and consecutive segments tile the timeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av

from .source import TIMELINE_OFFSET


@dataclass(frozen=True)
class Segment:
    index: int
    start: Fraction  # timeline seconds
    end: Fraction

    @property
    def duration(self) -> float:
        return float(self.end - self.start)


def fmt_time(t: Fraction | float) -> str:
    return f"{float(t):.3f}"


class Segmenter:
    """Per-packet work is integer tick comparisons; Fractions only at cuts."""

    def __init__(self, segment_seconds: int, time_base: Fraction, first_index: int = 0,
                 start: Fraction = Fraction(0)) -> None:
        self.segment_seconds = segment_seconds
        self.tb = time_base
        self.index = first_index
        self.start = start
        self._start_ticks = self._ticks(start)
        self._end_ticks = self._start_ticks  # end of the last video frame seen
        self._boundary_ticks = self._ticks(self._next_boundary(start))
        self.packets_in_segment = 0

    def _ticks(self, t: Fraction) -> int:
        return math.ceil((t + TIMELINE_OFFSET) / self.tb)

    def _seconds(self, ticks: int) -> Fraction:
        return ticks * self.tb - TIMELINE_OFFSET

    def _next_boundary(self, after: Fraction) -> Fraction:
        return Fraction((math.floor(after / self.segment_seconds) + 1) * self.segment_seconds)

    @property
    def video_end(self) -> Fraction:
        return self._seconds(self._end_ticks)

    def feed(self, packet: av.Packet, video: bool, frame_ticks: int) -> Segment | None:
        """Account for a packet; returns the segment that closes *before* it, if any."""
        closed = None
        if video:
            pts = packet.pts
            if (pts >= self._boundary_ticks and packet.is_keyframe and self.packets_in_segment
                    and pts > self._start_ticks):
                t = self._seconds(pts)
                closed = Segment(self.index, self.start, t)
                self.index += 1
                self.start, self._start_ticks = t, pts
                self._boundary_ticks = self._ticks(self._next_boundary(t))
                self.packets_in_segment = 0
            end = pts + (packet.duration or frame_ticks)
            if end > self._end_ticks:
                self._end_ticks = end
        self.packets_in_segment += 1
        return closed

    def finish(self) -> Segment | None:
        """The last, partial segment at end of input (None if it is empty)."""
        if not self.packets_in_segment or self._end_ticks <= self._start_ticks:
            return None
        end = self.video_end
        seg = Segment(self.index, self.start, end)
        self.index += 1
        self.start, self._start_ticks = end, self._end_ticks
        self.packets_in_segment = 0
        return seg
