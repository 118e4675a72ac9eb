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
    def __init__(self, segment_seconds: int, first_index: int = 0, start: Fraction = Fraction(0)) -> None:
        self.segment_seconds = segment_seconds
        self.index = first_index
        self.start = start
        self.video_end = start  # end of the last video frame seen
        self._boundary = self._next_boundary(start)
        self.packets_in_segment = 0

    def _next_boundary(self, after: Fraction) -> Fraction:
        return Fraction((math.floor(after / self.segment_seconds) + 1) * self.segment_seconds)

    def feed(self, packet: av.Packet, video: bool, frame_duration: Fraction) -> Segment | None:
        """Account for a packet; returns the segment that closes *before* it, if any."""
        closed = None
        if video:
            t = packet.pts * packet.stream.time_base - TIMELINE_OFFSET
            if packet.is_keyframe and t >= self._boundary and self.packets_in_segment and t > self.start:
                closed = Segment(self.index, self.start, t)
                self.index += 1
                self.start = t
                self._boundary = self._next_boundary(t)
                self.packets_in_segment = 0
            dur = packet.duration * packet.stream.time_base if packet.duration else frame_duration
            self.video_end = max(self.video_end, t + dur)
        self.packets_in_segment += 1
        return closed

    def finish(self) -> Segment | None:
        """The last, partial segment at end of input (None if it is empty)."""
        if not self.packets_in_segment or self.video_end <= self.start:
            return None
        seg = Segment(self.index, self.start, self.video_end)
        self.index += 1
        self.start = self.video_end
        self.packets_in_segment = 0
        return seg
