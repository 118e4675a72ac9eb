"""The segment pipeline for one input:

    source -> segmenter -> (HLS source rendition, frame sampler) -> batcher
           -> analysis -> per-segment record

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
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av

from ..analysis.analyzer import Analyzer, TextTokenMeter
from ..errors import StreamGuardError
from ..media.hls import LiveMedia, SourceRendition, codecs_attribute, segment_name, write_master, write_thumbnail
from ..media.sampler import FrameSampler, SampledFrame, SamplerStats
from ..media.segmenter import CUT_CAP, Segment, Segmenter, fmt_time
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
    # Renditions to write (CONTRACT §5): "source" (a remux) and/or the presets
    # 360p..1080p (encoded from one decode of the input, media/ladder.py).
    renditions: tuple[str, ...] = ("source",)
    x264_preset: str = "fast"  # libx264 preset of the encoded rungs

    @property
    def analyze(self) -> bool:
        """Whether frames go to the model at all (moderation is the only
        analysis today; logos and categorization will join it)."""
        return self.moderate


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

    def segment_url(self, index: int) -> str:
        return self.url(f"{self.rendition}/{segment_name(index)}")


class RepairTally:
    """Repairs made since the last segment closed, by kind: the remux's
    (hls.REPAIR_*) and the timestamp jumps the source absorbed ("jump")."""

    def __init__(self, rendition: SourceRendition, source: MediaSource) -> None:
        self._rendition, self._source = rendition, source
        self._seen = self._totals()

    def _totals(self) -> dict[str, int]:
        return {**self._rendition.repairs, "jump": self._source.jumps}

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
        self.rendition = SourceRendition(self.task_dir, opts.segment_seconds, next_index, live)
        self.stats = SamplerStats()
        self.segments = 0
        self._codecs: str | None = None
        self._master: str | None = None  # master playlist as last written
        self._thumbnail = not (self.task_dir / "thumbnail.jpg").exists()
        self.frames: list[tuple[Fraction, Future]] = []  # the open segment's frames
        # Duplicate-frame reuse is per task: its anchor dies with this pipeline.
        self.reuse = analyzer.stream_reuse() if analyzer is not None else None
        self._reused = 0  # the open segment's frames that reuse an embedding

    def cancel_frames(self) -> None:
        """Withdraw the open segment's frames from inference (any thread): a
        task ended at once has no use for them, and a shed one must not leave
        its backlog behind."""
        for _, fut in list(self.frames):
            fut.cancel()

    def consume(self, source: MediaSource, should_stop: Callable[[], str | None] = lambda: None,
                on_video: Callable[[], None] = lambda: None) -> str | None:
        """Read one open source until it ends, fails or a stop is requested.
        Returns why reading ended early (None at a clean end of input)."""
        assert source.video is not None
        video = source.video
        rendition = self.rendition
        rendition.bind(video, source.audio, discontinuity=self.segments > 0)
        self._codecs = codecs_attribute(video, source.audio)
        self._master = write_master(self.task_dir, [rendition], self._codecs)  # a resumed task has a playlist
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
            write_thumbnail(frame, self.task_dir / "thumbnail.jpg")

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
            self._master = write_master(self.task_dir, [rendition], self._codecs, self._master)
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

    def _add_stats(self, s: SamplerStats) -> None:
        for name, value in vars(s).items():
            setattr(self.stats, name, getattr(self.stats, name) + value)

    def close(self) -> None:
        """End of the task: the playlist gets #EXT-X-ENDLIST (a task that never
        got a segment gets no playlist and no master)."""
        if self.rendition.entries or (self.rendition.dir / "playlist.m3u8").exists():
            self.rendition.write_playlist(ended=True)
        self._master = write_master(self.task_dir, [self.rendition], self._codecs, self._master)


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
    return IngestResult(segments=pipe.segments, error=error, sampler=pipe.stats)


class RecordAssembler:
    """Builds the per-segment record of CONTRACT §3 from a closed segment."""

    def __init__(self, task_id: str, opts: PipelineOptions, analyzer: Analyzer | None, media: MediaLocator) -> None:
        self.task_id = task_id
        self.opts = opts
        self.analyzer = analyzer
        self.media = media
        self.text_tokens = TextTokenMeter()  # text encoded for this request alone

    async def build(self, closed: ClosedSegment) -> SegmentRecord:
        seg = closed.segment
        if closed.error:
            return status_record(self.task_id, STATUS_ERROR, closed.error)
        moderation = None
        video_tokens = text_tokens = 0
        if self.analyzer is not None and self.opts.moderate:
            try:
                moderation = await self.analyzer.moderate(closed.frames, self.opts.threshold)
            except StreamGuardError as exc:
                return status_record(self.task_id, STATUS_ERROR, f"segment {seg.index}: {exc.message}")
            # CONTRACT §3: frames run through the image encoder; reused ones were not.
            video_tokens = closed.frames_encoded * self.analyzer.tokens_per_image
            text_tokens = self.text_tokens.take()
        elapsed_ms = (time.monotonic() - closed.closed_at) * 1000
        note = seg.note
        data = SegmentData(
            segment_index=seg.index, start_time=fmt_time(seg.start), end_time=fmt_time(seg.end),
            video_url=self.media.segment_url(seg.index), content_moderation=moderation,
            processing_time_ms=str(round(elapsed_ms)),
        )
        return SegmentRecord(task_id=self.task_id, data=RecordBody(
            status=STATUS_OK, message=f"segment processed ({note})" if note else "segment processed", data=data,
            token=TokenUsage.of(video_tokens, text_tokens)))
