"""Cuts the packet stream into segments.

Rule (CONTRACT §3): a segment closes at the first video keyframe at or after
the next multiple of `segment_seconds` on the timeline. The source rendition
is a remux, so keyframes are the natural cuts; the reported times are the
actual cut times, and consecutive segments tile the timeline.

Two exceptions keep segments closing on any input:
- a segment that holds `cap_seconds(segment_seconds)` of media without a
  keyframe to cut at (a 20 s GOP, intra refresh) is cut at the next video
  packet anyway (`Segment.cut == "cap"`): the next segment then starts without
  a keyframe and is decoded on from the frames before it;
- after a timestamp jump (the source absorbed it, see source.py) the segment
  is cut at the first keyframe of the new run (`cut == "jump"`), so the HLS
  discontinuity falls on a segment boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av

from .source import TIMELINE_OFFSET

CUT_KEYFRAME = "keyframe"  # the rule: first keyframe at or after the boundary
CUT_CAP = "cap"  # no keyframe came: cut at a packet once the segment held the cap
CUT_JUMP = "jump"  # first keyframe after a timestamp jump
CUT_END = "end"  # end of input, a stop or a dropped connection


def cap_seconds(segment_seconds: int) -> int:
    """The longest a segment may last before it is cut without a keyframe."""
    return max(3 * segment_seconds, segment_seconds + 10)


@dataclass(frozen=True)
class Segment:
    index: int
    start: Fraction  # timeline seconds
    end: Fraction
    cut: str = CUT_KEYFRAME  # why it ended (CUT_*)

    @property
    def duration(self) -> float:
        return float(self.end - self.start)

    @property
    def note(self) -> str | None:
        """What the record says about a cut that was not the rule's."""
        if self.cut == CUT_CAP:
            return f"cut without a keyframe after {self.duration:.1f} s"
        if self.cut == CUT_JUMP:
            return "cut at a timestamp jump"
        return None


def fmt_time(t: Fraction | float) -> str:
    return f"{float(t):.3f}"


class Segmenter:
    """Per-packet work is integer tick comparisons; Fractions only at cuts."""

    def __init__(self, segment_seconds: int, time_base: Fraction, first_index: int = 0,
                 start: Fraction = Fraction(0)) -> None:
        self.segment_seconds = segment_seconds
        self.tb = time_base
        self._cap = Fraction(cap_seconds(segment_seconds))
        self.index = first_index
        self.packets_in_segment = 0
        self._jump_pending = False
        self._open(start, self._ticks(start))
        self._end_ticks = self._start_ticks  # end of the last video frame seen

    def _ticks(self, t: Fraction) -> int:
        return math.ceil((t + TIMELINE_OFFSET) / self.tb)

    def _seconds(self, ticks: int) -> Fraction:
        return ticks * self.tb - TIMELINE_OFFSET

    def _next_boundary(self, after: Fraction) -> Fraction:
        return Fraction((math.floor(after / self.segment_seconds) + 1) * self.segment_seconds)

    def _open(self, start: Fraction, start_ticks: int) -> None:
        self.start, self._start_ticks = start, start_ticks
        self._boundary_ticks = self._ticks(self._next_boundary(start))
        self._cap_ticks = self._ticks(start + self._cap)
        self.packets_in_segment = 0

    @property
    def video_end(self) -> Fraction:
        return self._seconds(self._end_ticks)

    def discontinuity(self) -> None:
        """The source absorbed a timestamp jump: cut at the next keyframe."""
        self._jump_pending = True

    def feed(self, packet: av.Packet, video: bool, frame_ticks: int) -> Segment | None:
        """Account for a packet; returns the segment that closes *before* it, if any."""
        closed = None
        if video:
            pts = packet.pts
            if (pts >= self._boundary_ticks or self._jump_pending) and self.packets_in_segment \
                    and pts > self._start_ticks:
                if packet.is_keyframe:
                    closed = self._cut(pts, CUT_JUMP if self._jump_pending and pts < self._boundary_ticks
                                       else CUT_KEYFRAME)
                elif pts >= self._cap_ticks:
                    closed = self._cut(pts, CUT_CAP)
            end = pts + (packet.duration or frame_ticks)
            if end > self._end_ticks:
                self._end_ticks = end
        self.packets_in_segment += 1
        return closed

    def _cut(self, pts: int, why: str) -> Segment:
        t = self._seconds(pts)
        closed = Segment(self.index, self.start, t, why)
        self.index += 1
        self._jump_pending = False
        self._open(t, pts)
        return closed

    def finish(self) -> Segment | None:
        """The last, partial segment at end of input (None if it is empty)."""
        if not self.packets_in_segment or self._end_ticks <= self._start_ticks:
            return None
        end = self.video_end
        seg = Segment(self.index, self.start, end, CUT_END)
        self.index += 1
        self._open(end, self._end_ticks)
        return seg
