"""The segment pipeline for one input:

    source -> segmenter -> (HLS source rendition, frame sampler) -> batcher
           -> analysis -> per-segment record

With encoded renditions (presets, media/ladder.py) every video frame is
decoded once, here, and that decode feeds every rung, the frame sampler and
the thumbnail:

    source -> decoder -> (ladder rungs, frame sampler) ; packets -> source remux

Cuts then: with "source" asked for, the remux's keyframe cuts (the rungs make
an IDR of the frame at each cut); without it, exactly at the first decoded
frame at or after each boundary. A segment's record is emitted once every
rung has written its file.

`SegmentPipeline` runs the media half in a worker thread (PyAV is blocking)
across one or more connections to the source, and hands each closed segment,
with futures for its sampled frames, to `emit`; `ingest()` is the one-shot
form for files.
`RecordAssembler` runs on the event loop and turns those, in order, into
records. The live hand-off queue between them is bounded (streams.py); it holds
only futures and small metadata; frames themselves wait in the batcher.

A bad packet does not cost a segment its record: timestamps are repaired
(source.py absorbs jumps, hls.py fixes what the remux refuses), undecodable
packets are skipped, and a segment gets -1 only when not one of its frames
could be decoded for analysis. Each repair is counted in
`ClosedSegment.repairs` (the daemon's `streamguard_packets_repaired_total`)
and logged once per segment.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Mapping

import av

from ..analysis.analyzer import Analyzer, TextTokenMeter
from ..analysis.categorize import DEFAULT_TOP_K, CategoryEvidence, summarize_categorization
from ..analysis.scoring import category_thresholds
from ..errors import StreamGuardError
from ..media.hls import (HlsRendition, LiveMedia, Publisher, SourceRendition, segment_name, write_master,
                         write_thumbnail)
from ..media.ladder import PRESETS, EncodedRendition, Ladder, is_preset, plan_ladder
from ..media.sampler import FrameSampler, SampledFrame, SamplerStats
from ..media.segmenter import CUT_CAP, CUT_JUMP, Segment, Segmenter, fmt_time
from ..media.source import MediaSource
from ..schemas import (STATUS_ERROR, STATUS_OK, RecordBody, SegmentData, SegmentRecord, TokenUsage,
                      status_record)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    segment_seconds: int = 5
    fps: int = 1
    threshold: float = 0.30
    moderate: bool = False
    categorize: bool = False
    top_k: int = DEFAULT_TOP_K  # categorization: the most categories listed
    # Per moderation category, thresholds replacing `threshold` (the node's
    # config map merged with the request's own).
    thresholds: Mapping[str, float] = field(default_factory=dict)
    # Renditions to write (CONTRACT §5): "source" (a remux) and/or the presets
    # 360p..1080p (encoded from one decode of the input, media/ladder.py).
    renditions: tuple[str, ...] = ("source",)
    x264_preset: str = "fast"  # libx264 preset of the encoded rungs

    @property
    def analyze(self) -> bool:
        """Whether frames go to the model at all (logos will join these)."""
        return self.moderate or self.categorize


@dataclass
class ClosedSegment:
    segment: Segment
    frames: list[tuple[Fraction, Future]]
    error: str | None
    closed_at: float  # time.monotonic() at the cut
    frames_decoded: int = 0  # decoder output while this segment was open
    repairs: dict[str, int] = field(default_factory=dict)  # made while it was open (RepairTally)
    # Frames that reuse an earlier frame's embedding (analysis/reuse.py): not
    # run through the encoder, so not billed as video tokens.
    frames_reused: int = 0
    # The rendition whose segment file the record's video_url names (None:
    # the locator's own): "source" when written, else the highest preset.
    rendition: str | None = None

    @property
    def frames_encoded(self) -> int:
        return len(self.frames) - self.frames_reused


@dataclass
class IngestResult:
    segments: int = 0
    error: str | None = None  # why the input was not read to its end
    sampler: SamplerStats = field(default_factory=SamplerStats)
    # The renditions actually written (presets above the source are not produced).
    renditions: list[str] = field(default_factory=lambda: ["source"])
    duration: float = 0.0  # timeline seconds read (end of the last segment)


class MediaLocator:
    """Where a task's media lives on disk and the URL it is served under."""

    def __init__(self, task_dir: Path, base_url: str | None, rendition: str = "source") -> None:
        self.task_dir = Path(task_dir)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.rendition = rendition  # the rendition records' video_url points into

    def url(self, relpath: str) -> str:
        if self.base_url:
            return f"{self.base_url}/{relpath}"
        return (self.task_dir / relpath).resolve().as_uri()

    def segment_url(self, index: int, rendition: str | None = None) -> str:
        return self.url(f"{rendition or self.rendition}/{segment_name(index)}")


class RepairTally:
    """Repairs made since the last segment closed, by kind: the remux's
    (hls.REPAIR_*) and the timestamp jumps the source absorbed ("jump")."""

    def __init__(self, rendition: SourceRendition | None, source: MediaSource) -> None:
        self._rendition, self._source = rendition, source
        self._seen = self._totals()

    def _totals(self) -> dict[str, int]:
        repairs = self._rendition.repairs if self._rendition is not None else {}
        return {**repairs, "jump": self._source.jumps}

    def take(self) -> dict[str, int]:
        now = self._totals()
        delta = {kind: n - self._seen.get(kind, 0) for kind, n in now.items() if n != self._seen.get(kind, 0)}
        self._seen = now
        return delta


class StopMode:
    """How a running ingest should stop: NOW closes the partial segment at once
    (user stop, balance), AFTER_SEGMENT lets the in-flight segment reach its
    cut first (drain, shedding)."""

    NOW = "now"
    AFTER_SEGMENT = "after_segment"


class SegmentPipeline:
    """The media half of one task: segments, HLS and sampled frames, across
    any number of connections to its source (live reconnects continue the
    segment numbering and the timeline). Blocking; run it in a worker thread."""

    def __init__(self, opts: PipelineOptions, task_dir: Path, analyzer: Analyzer | None,
                 emit: Callable[[ClosedSegment], None], *, next_index: int = 0,
                 timeline_start: Fraction = Fraction(0), live: LiveMedia | None = None) -> None:
        self.opts = opts
        self.task_dir = Path(task_dir)
        self.task_dir.mkdir(parents=True, exist_ok=True)
        self.analyzer = analyzer
        self.emit = emit
        self.next_index = next_index
        self.timeline_end = timeline_start
        self.live = live
        # The source remux, when asked for (or when nothing else was).
        self.rendition: SourceRendition | None = None
        if "source" in opts.renditions or not any(is_preset(r) for r in opts.renditions):
            self.rendition = SourceRendition(self.task_dir, opts.segment_seconds, next_index, live)
        self.ladder_mode = any(is_preset(r) for r in opts.renditions)
        # The encoded rungs, planned at the first connection (they need the
        # source's geometry) and kept across reconnects.
        self.encoded: list[EncodedRendition] | None = None
        self.stats = SamplerStats()
        self.segments = 0
        self._master: str | None = None  # master playlist as last written
        self._thumbnail = not (self.task_dir / "thumbnail.jpg").exists()
        self.frames: list[tuple[Fraction, Future]] = []  # the open segment's frames
        # Duplicate-frame reuse is per task: its anchor dies with this pipeline.
        self.reuse = analyzer.stream_reuse() if analyzer is not None else None
        self._reused = 0  # the open segment's frames that reuse an embedding

        self._waiting: deque[_Closing] = deque()  # ladder: cut segments waiting for their rungs

    @property
    def renditions(self) -> list[HlsRendition]:
        return ([self.rendition] if self.rendition is not None else []) + (self.encoded or [])

    @property
    def produced(self) -> list[str]:
        """The renditions written, in the order asked for (presets that would
        upscale the source are not; unknown before the first connection)."""
        names = {r.name for r in self.renditions}
        return [n for n in self.opts.renditions if n in names] or [r.name for r in self.renditions]

    @property
    def record_rendition(self) -> str:
        """The rendition records point into: the source remux when written,
        else the highest preset written."""
        if self.rendition is not None or not self.encoded:
            return "source"
        return max(self.encoded, key=lambda r: list(PRESETS).index(r.name)).name

    def cancel_frames(self) -> None:
        """Withdraw the open segment's frames from inference (any thread): a
        task ended at once has no use for them, and a shed one must not leave
        its backlog behind."""
        for closing in _snapshot(self._waiting):
            for _, fut in closing.frames:
                fut.cancel()
        for _, fut in list(self.frames):
            fut.cancel()

    def consume(self, source: MediaSource, should_stop: Callable[[], str | None] = lambda: None,
                on_video: Callable[[], None] = lambda: None) -> str | None:
        """Read one open source until it ends, fails or a stop is requested.
        Returns why reading ended early (None at a clean end of input)."""
        assert source.video is not None
        if self.ladder_mode:
            return self._consume_ladder(source, should_stop, on_video)
        video = source.video
        rendition = self.rendition
        assert rendition is not None
        rendition.bind(video, source.audio, discontinuity=self.segments > 0)
        self._write_master()  # a resumed task has a playlist
        rate = video.average_rate or video.guessed_rate or 25
        frame_ticks = max(1, round(1 / (Fraction(rate) * video.time_base)))  # for packets without a duration
        analyzer = self.analyzer
        self.frames = frames = []
        self._reused = 0

        def on_sample(sample: SampledFrame) -> None:
            assert self.reuse is not None
            fut, reused = self.reuse.submit(sample.crop)
            frames.append((sample.time, fut))
            self._reused += reused

        def on_first_frame(frame: av.VideoFrame) -> None:
            self._write_thumbnail(frame)

        sampler = FrameSampler(
            video, fps=self.opts.fps if analyzer is not None else None,
            size=analyzer.image_size if analyzer is not None else 224,
            on_sample=on_sample, on_first_frame=on_first_frame if self._thumbnail else None,
        )
        self._thumbnail = False
        segmenter = Segmenter(self.opts.segment_seconds, video.time_base, self.next_index, self.timeline_end)
        before = SamplerStats()  # sampler counters at the last cut
        repairs = RepairTally(rendition, source)
        jumps_seen = source.jumps
        after_jump = False  # the next segment starts after a timestamp jump

        def close(segment: Segment, cut_pts: int | None = None) -> None:
            nonlocal frames, before, after_jump
            if segment.cut == CUT_CAP:
                assert cut_pts is not None
                sampler.cut_without_keyframe(cut_pts)  # the next frames need this decoder's state
            else:
                sampler.end_segment()
            rendition.close_segment(segment)
            if segment.cut == CUT_CAP:
                rendition.mark_dependent()
            if after_jump:
                rendition.mark_discontinuity()
                after_jump = False
            self._write_master()
            now = sampler.stats
            fed = now.packets_decoded - before.packets_decoded
            decoded = now.frames_decoded - before.frames_decoded
            before = SamplerStats(**vars(now))
            repaired = repairs.take()
            if repaired:
                log.info("%s: segment %d: repaired packets %s", source.url, segment.index, repaired)
            error = None
            # -1 only when the decoder was given this segment's packets and not
            # one frame came out (with analysis, a sampled frame is a decoded
            # one). A segment that needed no decoding (no sample target in it)
            # is not failed for it.
            if fed and not decoded:
                error = f"segment {segment.index} has no decodable video ({fed} packets decoded to no frame)"
            reused, self._reused = self._reused, 0
            self.emit(ClosedSegment(segment, frames, error, time.monotonic(), decoded, repaired, reused))
            self.segments += 1
            self.next_index = segment.index + 1
            self.timeline_end = segment.end
            self.frames = frames = []

        stopped_at_cut = False
        try:
            for packet in source.packets():
                if should_stop() == StopMode.NOW:
                    break  # before this packet counts anywhere: the open segment ends with what it has
                if source.jumps != jumps_seen:  # this packet came after a timestamp jump
                    jumps_seen = source.jumps
                    after_jump = True
                    segmenter.discontinuity()
                is_video = packet.stream is video
                closed = segmenter.feed(packet, is_video, frame_ticks)
                if closed is not None:
                    close(closed, packet.pts)
                    if should_stop():
                        stopped_at_cut = True  # the cut keyframe opened no segment worth keeping
                        break
                if is_video:
                    on_video()
                    sampler.feed(packet)
                rendition.write(packet, copy=is_video and sampler.holds(packet))
            if not stopped_at_cut:
                last = segmenter.finish()
                if last is not None:
                    close(last)
        finally:
            rendition.abort()
            self._add_stats(sampler.stats)
        return source.read_error

    # --- the encoded ladder: one decode feeds the rungs, the sampler, the thumbnail ---

    def _plan(self, video: av.video.stream.VideoStream) -> list[EncodedRendition]:
        """The encoded rungs, fixed by the first connection's geometry (a
        later connection of another size is scaled into the same rungs)."""
        if self.encoded is None:
            ctx = video.codec_context
            plan = plan_ladder(self.opts.renditions, ctx.width, ctx.height, ctx.sample_aspect_ratio)
            self.encoded = [EncodedRendition(self.task_dir, preset, size, self.opts.segment_seconds,
                                             self.next_index, self.live) for preset, size in plan]
            skipped = [n for n in self.opts.renditions if is_preset(n) and n not in {p.name for p, _ in plan}]
            if skipped:
                log.info("%s: not produced (would upscale a %dx%d source): %s", self.task_dir.name,
                         ctx.width, ctx.height, ", ".join(skipped))
        return self.encoded

    def _consume_ladder(self, source: MediaSource, should_stop: Callable[[], str | None],
                        on_video: Callable[[], None]) -> str | None:
        assert source.video is not None
        video, audio = source.video, source.audio
        ctx = video.codec_context
        if not ctx.is_open:  # every frame is decoded: let the decoder use every core
            ctx.thread_type, ctx.thread_count = "AUTO", 0
        discontinuity = self.segments > 0
        if self.rendition is not None:
            self.rendition.bind(video, audio, discontinuity=discontinuity)
        encoded = self._plan(video)
        if discontinuity:
            for r in encoded:
                r.mark_discontinuity()
        self._write_master()
        ladder = Ladder(encoded, video, audio, self.opts.x264_preset)
        run = _LadderRun(self, source, ladder, should_stop)
        try:
            error = run.read(on_video)
            ladder.finish()
            run.emit_ready(final=True)
        except BaseException:
            ladder.abort()
            raise
        finally:
            if self.rendition is not None:
                self.rendition.abort()
            self._add_stats(run.sampler.stats)
        return error

    def _emit_ladder_segment(self, closing: _Closing, ladder: Ladder) -> None:
        seg = closing.segment
        ladder.close_segment(seg)
        if closing.jump_after:
            for r in ladder.renditions:
                r.mark_discontinuity()
        self._write_master()
        error = None
        if closing.packets and not closing.decoded:
            error = f"segment {seg.index} has no decodable video ({closing.packets} packets decoded to no frame)"
        if closing.repairs:
            log.info("%s: segment %d: repaired packets %s", self.task_dir.name, seg.index, closing.repairs)
        self.emit(ClosedSegment(seg, closing.frames, error, closing.closed_at, closing.decoded, closing.repairs,
                                closing.reused, rendition=self.record_rendition))
        self.segments += 1
        self.next_index = seg.index + 1
        self.timeline_end = seg.end

    @property
    def _publish(self) -> Publisher | None:
        return self.live.publish if self.live is not None else None

    def _write_master(self) -> None:
        self._master = write_master(self.task_dir, self.renditions, self._master, self._publish)

    def _write_thumbnail(self, frame: av.VideoFrame) -> None:
        write_thumbnail(frame, self.task_dir / "thumbnail.jpg", publish=self._publish)

    def _add_stats(self, s: SamplerStats) -> None:
        for name, value in vars(s).items():
            setattr(self.stats, name, getattr(self.stats, name) + value)

    def close(self) -> None:
        """End of the task: the playlists get #EXT-X-ENDLIST (a task that never
        got a segment gets no playlist and no master)."""
        for rendition in self.renditions:
            if rendition.entries or rendition.has_playlist:
                rendition.write_playlist(ended=True)
        self._write_master()


def _snapshot(items: deque) -> list:
    """A copy of a deque the ingest thread may be changing (another thread's
    view: iterating it while it changes raises)."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:
            continue
    return []


@dataclass
class _Closing:
    """A ladder segment whose frames are all in, waiting for its rungs' files."""

    segment: Segment
    frames: list[tuple[Fraction, Future]]
    decoded: int
    packets: int
    reused: int
    repairs: dict[str, int]
    jump_after: bool  # the next segment follows a timestamp jump
    closed_at: float = field(default_factory=time.monotonic)


class _FrameCut:
    """A decoded frame, shown to the Segmenter as a packet that may be cut at:
    without the source remux, segments cut exactly at frames."""

    __slots__ = ("pts", "duration")
    is_keyframe = True

    def __init__(self, pts: int, duration: int) -> None:
        self.pts, self.duration = pts, duration


class _LadderRun:
    """One connection's read loop for the encoded ladder (SegmentPipeline's
    ladder mode). Packet-side cuts (the source remux's, when written) wait in
    `cuts` until the decoded frames reach them; frame-side, each cut becomes
    an IDR in every rung and a `_Closing` waiting for the rungs' files."""

    def __init__(self, pipe: SegmentPipeline, source: MediaSource, ladder: Ladder,
                 should_stop: Callable[[], str | None]) -> None:
        assert source.video is not None
        self.pipe, self.source, self.ladder, self.should_stop = pipe, source, ladder, should_stop
        video = source.video
        self.video = video
        self.decoder = video.codec_context
        opts, analyzer = pipe.opts, pipe.analyzer
        rate = video.average_rate or video.guessed_rate or 25
        self.frame_ticks = max(1, round(1 / (Fraction(rate) * video.time_base)))
        self.sampler = FrameSampler(
            video, fps=opts.fps if analyzer is not None else None,
            size=analyzer.image_size if analyzer is not None else 224,
            on_sample=self._on_sample, on_first_frame=self._thumbnail if pipe._thumbnail else None)
        pipe._thumbnail = False
        segmenter = Segmenter(opts.segment_seconds, video.time_base, pipe.next_index, pipe.timeline_end)
        # With the remux, packets are cut (at keyframes); without, frames are.
        self.packet_cuts = segmenter if pipe.rendition is not None else None
        self.frame_cuts = segmenter if pipe.rendition is None else None
        self.cuts: deque[tuple[Segment, int | None, bool]] = deque()  # (segment, cut pts, jump after)
        self.waiting = pipe._waiting
        self.waiting.clear()
        pipe.frames = []
        pipe._reused = 0
        self.decoded = 0  # frames of the open segment
        self.packets = 0  # video packets fed to the decoder for the open segment
        self.first = True  # the next frame starts this connection's first segment
        self.after_jump = False
        self.repairs = RepairTally(pipe.rendition, source)

    def _on_sample(self, sample: SampledFrame) -> None:
        assert self.pipe.reuse is not None
        fut, reused = self.pipe.reuse.submit(sample.crop)
        self.pipe.frames.append((sample.time, fut))
        self.pipe._reused += reused

    def _thumbnail(self, frame: av.VideoFrame) -> None:
        self.pipe._write_thumbnail(frame)

    def read(self, on_video: Callable[[], None]) -> str | None:
        """Read the connection to its end (or a stop); every cut segment ends
        up waiting in `waiting`. Returns the source's read error."""
        source, pipe = self.source, self.pipe
        rendition = pipe.rendition
        jumps_seen = source.jumps
        stopped_at_cut = False
        for packet in source.packets():
            if self.should_stop() == StopMode.NOW:
                break
            if source.jumps != jumps_seen:
                jumps_seen = source.jumps
                self.after_jump = True
                (self.packet_cuts or self.frame_cuts).discontinuity()  # type: ignore[union-attr]
            is_video = packet.stream is self.video
            if self.packet_cuts is not None:
                assert rendition is not None
                closed = self.packet_cuts.feed(packet, is_video, self.frame_ticks)
                if closed is not None:
                    rendition.close_segment(closed)
                    if closed.cut == CUT_CAP:
                        rendition.mark_dependent()
                    if self.after_jump:
                        rendition.mark_discontinuity()
                    self.cuts.append((closed, packet.pts, self.after_jump))
                    self.after_jump = False
                    if self.should_stop():
                        stopped_at_cut = True
                        break
            if is_video:
                on_video()
                self.packets += 1
                if self._decode(packet):
                    stopped_at_cut = True
                    break
            else:
                self.ladder.audio_packet(packet)
            if rendition is not None:
                rendition.write(packet)
            self.emit_ready()
        if not (stopped_at_cut and self.frame_cuts is not None):
            self._decode(None)  # the decoder's last frames (with the remux: all before any stop cut)
        if not stopped_at_cut:
            segmenter = self.packet_cuts or self.frame_cuts
            assert segmenter is not None
            last = segmenter.finish()
            if last is not None:
                if rendition is not None:
                    rendition.close_segment(last)
                self.cuts.append((last, None, False))
        while self.cuts:
            self._cut_reached()
        return source.read_error

    def _decode(self, packet: av.Packet | None) -> bool:
        """Decode one packet (None: drain) and hand its frames on; True when a
        stop was asked for at a cut."""
        stats = self.sampler.stats
        if packet is not None:
            stats.packets_decoded += 1
        try:
            frames = self.decoder.decode(packet)
        except av.error.FFmpegError:
            stats.decode_errors += 1
            return False
        for frame in frames:
            if self._frame(frame):
                return True
        return False

    def _frame(self, frame: av.VideoFrame) -> bool:
        pts = frame.pts
        if pts is None:
            return False
        starts = None
        if self.first:
            starts, self.first = self.pipe.next_index, False
        if self.packet_cuts is not None:
            while self.cuts and self.cuts[0][1] is not None and pts >= self.cuts[0][1]:
                starts = self._cut_reached()
        else:
            assert self.frame_cuts is not None
            closed = self.frame_cuts.feed(_FrameCut(pts, frame.duration or self.frame_ticks), True,
                                          self.frame_ticks)
            if closed is not None:
                self.cuts.append((closed, pts, self.after_jump and closed.cut == CUT_JUMP))
                if closed.cut == CUT_JUMP:
                    self.after_jump = False
                starts = self._cut_reached()
                if self.should_stop():
                    return True
        self.sampler.take(frame)
        self.decoded += 1
        self.ladder.video(frame, starts)
        return False

    def _cut_reached(self) -> int:
        """The frames have passed the oldest cut: that segment is complete
        here; returns the index of the one it opens."""
        segment, _, jump_after = self.cuts.popleft()
        pipe = self.pipe
        self.sampler.end_segment()
        self.waiting.append(_Closing(segment, pipe.frames, self.decoded, self.packets, pipe._reused,
                                     self.repairs.take(), jump_after))
        pipe.frames = []
        pipe._reused = 0
        self.decoded = self.packets = 0
        return segment.index + 1

    def emit_ready(self, final: bool = False) -> None:
        """Emit, in order, the segments every rung has written (all at the end)."""
        while self.waiting and (final or self.ladder.complete(self.waiting[0].segment.index)):
            self.pipe._emit_ladder_segment(self.waiting.popleft(), self.ladder)


def ingest(source: MediaSource, opts: PipelineOptions, task_dir: Path, analyzer: Analyzer | None,
           emit: Callable[[ClosedSegment], None],
           should_stop: Callable[[], str | None] = lambda: None) -> IngestResult:
    """Read one open source (a file, or a stream until it ends) to its end, or
    until `should_stop` returns a StopMode (file jobs: drain, balance). Blocking."""
    pipe = SegmentPipeline(opts, task_dir, analyzer, emit)
    try:
        error = pipe.consume(source, should_stop)
    finally:
        pipe.close()
    return IngestResult(segments=pipe.segments, error=error, sampler=pipe.stats, renditions=pipe.produced,
                        duration=float(pipe.timeline_end))


class RecordAssembler:
    """Builds the per-segment record of CONTRACT §3 from a closed segment.
    `categories` adds up the categorization evidence of every segment built
    so far: summarize_categorization(assembler.categories, top_k) is the whole
    input's categorization (a job's summary)."""

    def __init__(self, task_id: str, opts: PipelineOptions, analyzer: Analyzer | None, media: MediaLocator) -> None:
        self.task_id = task_id
        self.opts = opts
        self.analyzer = analyzer
        self.media = media
        self.text_tokens = TextTokenMeter()  # text encoded for this request alone
        self.thresholds = category_thresholds(opts.threshold, opts.thresholds)
        self.categories = CategoryEvidence.empty()

    async def build(self, closed: ClosedSegment) -> SegmentRecord:
        seg = closed.segment
        if closed.error:
            return status_record(self.task_id, STATUS_ERROR, closed.error)
        moderation = categorization = None
        video_tokens = text_tokens = 0
        if self.analyzer is not None and self.opts.analyze:
            try:
                embeddings = await self.analyzer.embeddings(closed.frames)
            except StreamGuardError as exc:
                return status_record(self.task_id, STATUS_ERROR, f"segment {seg.index}: {exc.message}")
            if self.opts.moderate:
                moderation = self.analyzer.moderation(closed.frames, embeddings, self.thresholds)
            if self.opts.categorize:
                evidence = self.analyzer.category_evidence(embeddings)
                self.categories += evidence
                result = summarize_categorization(evidence, self.opts.top_k)
                categorization = result.record() if result is not None else None
            # CONTRACT §3: frames run through the image encoder (once, whatever
            # analyses use them); reused ones were not.
            video_tokens = closed.frames_encoded * self.analyzer.tokens_per_image
            text_tokens = self.text_tokens.take()
        elapsed_ms = (time.monotonic() - closed.closed_at) * 1000
        note = seg.note
        data = SegmentData(
            segment_index=seg.index, start_time=fmt_time(seg.start), end_time=fmt_time(seg.end),
            video_url=self.media.segment_url(seg.index, closed.rendition), content_moderation=moderation,
            categorization=categorization, processing_time_ms=str(round(elapsed_ms)),
        )
        return SegmentRecord(task_id=self.task_id, data=RecordBody(
            status=STATUS_OK, message=f"segment processed ({note})" if note else "segment processed", data=data,
            token=TokenUsage.of(video_tokens, text_tokens)))
