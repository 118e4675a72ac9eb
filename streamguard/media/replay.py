"""Not replaying what a source already delivered.

An http(s) source is pulled: when the task reconnects, the server decides what
comes first, and a recording (or an HLS playlist that ended, which FFmpeg
reopens as VOD) starts again at its beginning. A ReplayGuard remembers the
video keyframes a task's source delivered, across its connections, by their
own timestamps and bytes. A connection whose first keyframe is one already
seen skips ahead to video past the newest one seen (a live playlist's overlap
with the previous connection), and gives up when that takes longer than
`max_skip_seconds` of media or the task must stop (a replayed recording).
"""

from __future__ import annotations

import zlib
from collections import deque
from fractions import Fraction
from typing import Callable

import av

Fingerprint = tuple[Fraction, int, int]  # (time in the source's own timestamps, size, CRC-32)


class ReplayGuard:
    FIRST = 64  # the start of what the task saw first: where a reopened recording begins again
    RECENT = 512  # the newest: what a live playlist repeats after a reconnect

    def __init__(self, abort: Callable[[], bool] = lambda: False, max_skip_seconds: float = 120.0) -> None:
        self.abort = abort
        self.max_skip = Fraction(max_skip_seconds)
        self._first: set[Fingerprint] = set()
        self._recent: deque[Fingerprint] = deque(maxlen=self.RECENT)
        self._recent_set: set[Fingerprint] = set()
        self._newest: Fraction | None = None
        self._replaying = False
        self._skip_from: Fraction | None = None
        self.skipped = 0  # keyframes skipped over the task's life

    @staticmethod
    def _fingerprint(packet: av.Packet, t: Fraction) -> Fingerprint:
        return (t, packet.size, zlib.crc32(memoryview(packet)))

    def begin(self) -> None:
        """A new connection: nothing judged yet."""
        self._replaying = False
        self._skip_from = None

    def note(self, packet: av.Packet) -> None:
        """A video packet delivered (with the source's own timestamps)."""
        if packet.pts is None:
            return
        t = packet.pts * packet.stream.time_base
        if self._newest is None or t > self._newest:
            self._newest = t
        if not packet.is_keyframe:
            return
        fp = self._fingerprint(packet, t)
        if len(self._first) < self.FIRST:
            self._first.add(fp)
        elif fp not in self._recent_set:
            if len(self._recent) == self.RECENT:
                self._recent_set.discard(self._recent[0])
            self._recent.append(fp)
            self._recent_set.add(fp)

    def seen(self, keyframe: av.Packet) -> bool:
        """Whether a connection's would-be first keyframe was delivered before
        (then this connection skips to video past the newest seen)."""
        assert keyframe.pts is not None
        t = keyframe.pts * keyframe.stream.time_base
        if not self._replaying:
            fp = self._fingerprint(keyframe, t)
            self._replaying = fp in self._first or fp in self._recent_set
        if not self._replaying or self._newest is None or t > self._newest:
            return False
        if self._skip_from is None:
            self._skip_from = t
        self.skipped += 1
        return True

    def give_up(self, packet: av.Packet) -> str | None:
        """While skipping: why this connection should end now, or None."""
        if self._skip_from is None:
            return None
        t = packet.pts * packet.stream.time_base if packet.pts is not None else self._skip_from
        if self.abort() or t - self._skip_from > self.max_skip:
            return self.why_nothing()
        return None

    def why_nothing(self) -> str | None:
        """Why a connection delivered no video: it only replayed old video (or None)."""
        if self._skip_from is None:
            return None
        return (f"the source replays video already delivered (from {float(self._skip_from):.1f} s of its "
                f"own timestamps); not replaying it")
