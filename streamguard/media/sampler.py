"""Frame sampler: decodes only what sampling needs.

Targets lie on a grid of 1/fps seconds on the timeline; each takes the first
frame whose pts reaches it. Packets are held back (not decoded) until one
reaches the next target; a GOP whose tail holds no target is dropped at the
next keyframe without ever being decoded, and the decoder is reset there. So at
fps 1 with 2 s GOPs, only the frames up to each sampled one are decoded.

At a cut without a keyframe (the segment cap, see segmenter.py) the decoder
is neither drained nor reset: the frames after the cut reference the ones
before it. Frames that come out of the decoder late and lie before that cut
are not sampled for the new segment; the next frame after it takes their
target instead.

Without fps (no analysis) the sampler still decodes the first frame of each
segment that starts at a keyframe, which is what tells a segment with
decodable video from one without.

With the encoded ladder the pipeline decodes every frame itself and hands
them over (`take`): no second decoder.

Sampled frames are centre-cropped and scaled to the model's input in swscale
(see scaler.py): CLIP's reference preprocessing. For logo detection the
caller's `full_frame` may also take the whole decoded frame (as RGB), so the
regions beyond the centre crop come from the same decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import av
import numpy as np

from .scaler import CentreCropScaler
from .source import TIMELINE_OFFSET

NEG_INF = -(2**62)


@dataclass
class SampledFrame:
    time: Fraction  # timeline seconds
    crop: np.ndarray  # uint8 RGB, size x size x 3
    frame: av.VideoFrame | None = None  # the decoded frame it was cut from (a reference, no copy)
    # The whole frame as RGB (logo detection looks beyond the centre crop),
    # when the sampler's `full_frame` asked for it; from the same decode.
    full: np.ndarray | None = None


@dataclass
class SamplerStats:
    frames_decoded: int = 0
    frames_sampled: int = 0
    decode_errors: int = 0
    packets_decoded: int = 0  # packets given to the decoder


class FrameSampler:
    def __init__(
        self,
        stream: av.video.stream.VideoStream,
        *,
        fps: int | None,
        size: int,
        on_sample: Callable[[SampledFrame], None],
        on_first_frame: Callable[[av.VideoFrame], None] | None = None,
        full_frame: Callable[[av.VideoFrame], np.ndarray | None] | None = None,
    ) -> None:
        self.ctx = stream.codec_context
        self.tb = stream.time_base
        self.fps = fps
        self.scale = CentreCropScaler(size)
        self.on_sample = on_sample
        self.on_first_frame = on_first_frame
        self.full_frame = full_frame
        # Without fps only each segment's first frame is wanted (the thumbnail,
        # and proof that the segment decodes).
        self.next_target: Fraction | None = None
        self._target_ticks = 0  # next_target in stream ticks, for cheap per-packet checks
        self._set_target(Fraction(0))
        self._floor_ticks = NEG_INF  # frames before this pts belong to a closed segment
        self.stats = SamplerStats()
        self._pending: list[av.Packet] = []
        self._max_fed = NEG_INF
        self._fed = False
        self._skipping = False

    def _t(self, pts: int) -> Fraction:
        return pts * self.tb - TIMELINE_OFFSET

    def _set_target(self, target: Fraction | None) -> None:
        self.next_target = target
        if target is not None:
            self._target_ticks = math.ceil((target + TIMELINE_OFFSET) / self.tb)

    def _active(self) -> bool:
        return self.next_target is not None and self._target_ticks <= self._max_fed

    def feed(self, packet: av.Packet) -> None:
        if packet.is_keyframe and not self._active():
            self._pending.clear()  # the GOP tail held no target: never decode it
            self._reset()
        if self.next_target is None:
            return
        self._pending.append(packet)
        if packet.pts >= self._target_ticks or self._active():
            self._feed_pending()

    def take(self, frame: av.VideoFrame) -> None:
        """Frame-fed path: a frame the caller decoded (the encoded ladder
        decodes every frame once for all its consumers), in presentation
        order. Sampled exactly as a frame this sampler decoded itself; call
        `end_segment()` before the first frame of each new segment."""
        self.stats.frames_decoded += 1
        self._on_frame(frame)

    def holds(self, packet: av.Packet) -> bool:
        """Whether `packet` waits undecoded here (so others must not consume it)."""
        return bool(self._pending) and self._pending[-1] is packet

    def end_segment(self) -> None:
        """Called before a cut at a keyframe: drain the decoder so every frame
        of the closing segment is out, then start clean at the cut keyframe."""
        if self._fed:
            self._set_skip(False)
            self._decode(None)
        self._pending.clear()
        self._reset()
        self._floor_ticks = NEG_INF
        if not self.fps:
            self._set_target(Fraction(0))  # the next segment's first frame

    finish = end_segment

    def cut_without_keyframe(self, cut_pts: int) -> None:
        """Called before a cut at a packet that is not a keyframe: keep the
        decoder and the packets it still needs; frames before the cut that
        come out later are not the new segment's."""
        self._floor_ticks = cut_pts

    def _reset(self) -> None:
        if self._fed:
            self.ctx.flush_buffers()
            self._fed = False
        self._max_fed = NEG_INF

    def _feed_pending(self) -> None:
        for packet in self._pending:
            pts = packet.pts
            # Frames before the target that nothing references (most B-frames)
            # need not be decoded at all.
            self._set_skip(self.next_target is not None and pts < self._target_ticks)
            if pts > self._max_fed:
                self._max_fed = pts
            self._fed = True
            self._decode(packet)
        self._pending.clear()

    def _set_skip(self, skip_nonref: bool) -> None:
        if skip_nonref != self._skipping:
            self.ctx.skip_frame = "NONREF" if skip_nonref else "DEFAULT"
            self._skipping = skip_nonref

    def _decode(self, packet: av.Packet | None) -> None:
        if packet is not None:
            self.stats.packets_decoded += 1
        try:
            frames = self.ctx.decode(packet)
        except av.error.FFmpegError:
            self.stats.decode_errors += 1
            return
        for frame in frames:
            self.stats.frames_decoded += 1
            self._on_frame(frame)

    def _on_frame(self, frame: av.VideoFrame) -> None:
        if frame.pts is None or self.next_target is None or frame.pts < self._target_ticks \
                or frame.pts < self._floor_ticks:
            return
        t = self._t(frame.pts)
        if self.on_first_frame is not None:
            self.on_first_frame(frame)
            self.on_first_frame = None
        if self.fps:
            self.stats.frames_sampled += 1
            full = self.full_frame(frame) if self.full_frame is not None else None
            self.on_sample(SampledFrame(t, self.scale(frame, self.ctx.sample_aspect_ratio), frame, full))
            self._set_target(Fraction(math.floor(t * self.fps) + 1, self.fps))
        else:
            self._set_target(None)
