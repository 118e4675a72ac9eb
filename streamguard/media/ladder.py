"""The encoded HLS ladder (CONTRACT §5): the presets 360p..1080p, encoded
with libx264 + AAC from the one decode of the input that also feeds the frame
sampler (pipeline/segments.py).

Geometry (`fit`): each preset's box (640x360 ... 1920x1080) is filled as far
as the source's display aspect allows (its sample aspect ratio applied; the
output has square pixels), portrait included (a 720x1280 source becomes
202x360 in the 360p box), with even dimensions. A preset whose fit would scale
the source up is not produced (`plan_ladder`).

Segments: the pipeline tells each rung at which decoded frame a segment
starts; that frame is encoded as an IDR (`pict_type = I` with x264's
`forced-idr`), so segment N of every rung starts with an IDR at the same time,
which is also the record's start_time. The encoder is never flushed at a
segment: its output packets are routed into `segment_NNN.ts` by the IDR that
starts each segment, and the audio packets (AAC, one encoder per distinct
bit rate, shared by the rungs that use it) follow by timestamp.

Threads: each rung scales (swscale, `VideoReformatter`) and encodes in its own
worker thread; PyAV releases the GIL in `sws_scale_frame` and
`avcodec_send_frame`/`receive_packet`, and x264 runs its own frame threads
(`threads=auto`), so a ladder uses every core. A rung's worker owns its
encoder and files; the pipeline thread owns the playlists (`EncodedRendition`)
and lists a segment only once every rung has written it.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
from av.video.frame import PictureType
from av.video.reformatter import Interpolation, VideoReformatter

from .hls import HlsRendition, LiveMedia, avc_codec_from_annexb, close_quietly, segment_name
from .segmenter import Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    width: int  # the box the picture is fitted into
    height: int
    video_bitrate: int  # b:v = maxrate; bufsize is twice this
    audio_bitrate: int


# CONTRACT §5, lowest first.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("360p", 640, 360, 800_000, 96_000),
    Preset("480p", 854, 480, 1_400_000, 128_000),
    Preset("720p", 1280, 720, 2_800_000, 128_000),
    Preset("1080p", 1920, 1080, 5_000_000, 192_000),
)}

# Frames a rung's worker may have queued before the pipeline waits for it:
# enough to ride out an x264 stall, few enough that decoded 1080p frames
# (3 MB each) never pile up.
MAX_QUEUED_FRAMES = 6

# Sample rates the AAC encoder takes; any other source rate is resampled to 48 kHz.
AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000})


def is_preset(name: str) -> bool:
    return name in PRESETS


def _even(x: Fraction) -> int:
    return max(2, 2 * round(x / 2))


def fit(preset: Preset, width: int, height: int, sar: Fraction | None = None) -> tuple[int, int] | None:
    """The preset's output size for a width x height source (storage pixels
    of aspect `sar`): the largest even size within the box at the source's
    display aspect; None when that would scale the source up."""
    display_w = width * sar if sar and sar > 0 else Fraction(width)
    scale = min(preset.width / display_w, Fraction(preset.height, height))
    if scale > 1:
        return None
    return min(preset.width, _even(display_w * scale)), min(preset.height, _even(height * scale))


def plan_ladder(requested: Sequence[str], width: int, height: int,
                sar: Fraction | None = None) -> list[tuple[Preset, tuple[int, int]]]:
    """The presets of `requested` (in that order) this source gets, with
    their sizes: those that would upscale are left out. When none of the
    requested presets can be produced (a source smaller than every box asked
    for), the smallest one requested is produced at the source's own display
    size (rounded to even), so the ladder is never empty."""
    presets = [PRESETS[n] for n in requested if n in PRESETS]
    plan = [(p, size) for p in presets if (size := fit(p, width, height, sar)) is not None]
    if presets and not plan:
        display_w = width * sar if sar and sar > 0 else Fraction(width)
        smallest = min(presets, key=lambda p: p.width * p.height)
        plan = [(smallest, (_even(display_w), _even(Fraction(height))))]
    return plan


class EncodedRendition(HlsRendition):
    """The playlist side of one encoded rung (pipeline thread): lists each
    segment once its worker has written the file."""

    def __init__(self, task_dir: Path, preset: Preset, size: tuple[int, int], segment_seconds: int,
                 next_index: int = 0, live: LiveMedia | None = None) -> None:
        self.name = preset.name
        super().__init__(task_dir, segment_seconds, next_index, live)
        self.preset = preset
        self.width, self.height = size
        self.nominal_bandwidth = preset.video_bitrate + preset.audio_bitrate

    def close_segment(self, segment: Segment, written: bool) -> None:
        if written:
            self._segment_written(segment, (self.dir / segment_name(segment.index)).stat().st_size)
        else:
            self._segment_skipped(segment)


def copy_packet(packet: av.Packet) -> av.Packet:
    """A packet with its own data (muxing takes a packet's data and rescales
    its timestamps, so each rung muxes its own copy of a shared one)."""
    dup = av.Packet(packet)
    dup.pts, dup.dts, dup.duration = packet.pts, packet.dts, packet.duration
    dup.time_base, dup.is_keyframe = packet.time_base, packet.is_keyframe
    return dup


def _close_template(container: av.container.OutputContainer) -> None:
    try:
        container.close()
    except av.error.FFmpegError:
        pass


class AudioLadder:
    """Decodes the input's audio once and encodes it to AAC once per distinct
    bit rate. Runs on the pipeline thread (AAC is cheap next to x264)."""

    def __init__(self, audio_in: av.audio.stream.AudioStream, bitrates: set[int]) -> None:
        self.decoder = audio_in.codec_context
        rate = audio_in.sample_rate if audio_in.sample_rate in AAC_RATES else 48000
        layout = "mono" if audio_in.codec_context.layout.nb_channels == 1 else "stereo"
        self.resampler = av.AudioResampler("fltp", layout, rate, frame_size=1024)
        # The encoders live in a container that is never written: its streams
        # are the templates the rungs' segment files copy (AAC extradata).
        self.template = av.open(io.BytesIO(), "w", format="mpegts")
        self.streams: dict[int, av.audio.stream.AudioStream] = {}
        for bitrate in sorted(bitrates):
            stream = self.template.add_stream("aac", rate=rate)
            stream.layout = layout
            stream.bit_rate = bitrate
            self.streams[bitrate] = stream
        self.template.start_encoding()
        self.decode_errors = 0

    def feed(self, packet: av.Packet | None) -> dict[int, list[av.Packet]]:
        """Encoded packets per bit rate for one input packet (None: the end)."""
        try:
            frames = self.decoder.decode(packet)
        except av.error.FFmpegError:
            self.decode_errors += 1
            frames = []
        resampled = [r for f in frames for r in self.resampler.resample(f)]
        if packet is None:
            resampled += self.resampler.resample(None)
        out: dict[int, list[av.Packet]] = {}
        for bitrate, stream in self.streams.items():
            packets = [p for f in resampled for p in stream.encode(f)]
            if packet is None:
                packets += stream.encode(None)
            out[bitrate] = packets
        return out

    def close(self) -> None:
        _close_template(self.template)


class RungEncoder:
    """One rung for one connection, run on its own worker thread: scale,
    encode, and route the packets into segment files. `done` maps each
    segment index whose file is complete to whether it was written (False:
    skipped, disk below the floor); the pipeline thread reads it."""

    def __init__(self, rendition: EncodedRendition, video_in: av.video.stream.VideoStream,
                 audio_template: av.audio.stream.AudioStream | None, x264_preset: str, threads: int = 0) -> None:
        self.rendition = rendition
        self.dir = rendition.dir
        self.live = rendition.live
        preset = rendition.preset
        rate = video_in.average_rate or video_in.guessed_rate or Fraction(25)
        self.template = av.open(io.BytesIO(), "w", format="mpegts")
        v = self.template.add_stream("libx264", rate=rate)
        v.width, v.height, v.pix_fmt = rendition.width, rendition.height, "yuv420p"
        ctx = v.codec_context
        ctx.time_base = video_in.time_base
        ctx.sample_aspect_ratio = Fraction(1)  # the output has square pixels
        ctx.thread_count = threads  # 0: x264's own (1.5 x cores)
        v.bit_rate = preset.video_bitrate
        v.options = {"preset": x264_preset, "forced-idr": "1",
                     "maxrate": str(preset.video_bitrate), "bufsize": str(2 * preset.video_bitrate)}
        self.template.start_encoding()
        self.video = v
        self.audio_template = audio_template
        self.scaler = VideoReformatter()
        self.codecs: str | None = None
        self._starts: dict[int, int] = {}  # pts of a segment's first frame -> its index
        self._out: av.container.OutputContainer | None = None
        self._ov: av.stream.Stream | None = None
        self._oa: av.stream.Stream | None = None
        self._index: int | None = None  # the segment being written (or skipped)
        self._audio: deque[av.Packet] = deque()
        self.done: dict[int, bool] = {}
        self.last_done = -1  # the newest segment index whose file is complete
        self.frames = 0

    # --- worker thread -------------------------------------------------------

    def encode_video(self, frame: av.VideoFrame, starts: int | None) -> None:
        r = self.rendition
        out = self.scaler.reformat(frame, r.width, r.height, "yuv420p", interpolation=Interpolation.BICUBIC)
        if starts is not None:
            out.pict_type = PictureType.I
            self._starts[frame.pts] = starts
        else:
            out.pict_type = PictureType.NONE  # a decoded I frame must not force a keyframe here
        self.frames += 1
        for packet in self.video.encode(out):
            self._route(packet)

    def add_audio(self, packets: list[av.Packet]) -> None:
        self._audio.extend(packets)

    def finish(self) -> None:
        """End of this connection: drain the encoder, close the last file."""
        for packet in self.video.encode(None):
            self._route(packet)
        self._close(None)
        _close_template(self.template)

    def abort(self) -> None:
        close_quietly(self._out)
        self._out = None
        _close_template(self.template)

    def _route(self, packet: av.Packet) -> None:
        if packet.is_keyframe and (index := self._starts.pop(packet.pts, None)) is not None:
            self._close(packet.pts * packet.time_base)
            self._open(index)
            if self.codecs is None:
                video = avc_codec_from_annexb(bytes(packet))
                self.codecs = f"{video},mp4a.40.2" if video and self.audio_template is not None else video
        if self._out is None:
            return  # skipped segment (or, defensively, video before the first start)
        self._write_audio(packet.pts * packet.time_base)
        packet.stream = self._ov
        self._out.mux(packet)

    def _write_audio(self, until: Fraction | None) -> None:
        """Mux the buffered audio up to `until` (timeline of the video; None: all)."""
        queue = self._audio
        while queue and (until is None or queue[0].pts * queue[0].time_base < until):
            packet = queue.popleft()
            if self._out is not None and self._oa is not None:
                packet.stream = self._oa
                self._out.mux(packet)

    def _open(self, index: int) -> None:
        self._index = index
        if self.live is not None and not self.live.may_write():
            return
        self._out = av.open(str(self.dir / segment_name(index)), mode="w", format="mpegts")
        self._ov = self._out.add_stream_from_template(self.video)
        self._oa = self._out.add_stream_from_template(self.audio_template) if self.audio_template else None

    def _close(self, until: Fraction | None) -> None:
        """The open segment ends at `until` (None: end of input)."""
        if self._index is None:
            return
        self._write_audio(until)
        written = self._out is not None
        if self._out is not None:
            self._out.close()
            self._out = None
        self.done[self._index] = written
        self.last_done = self._index
        self._index = None


class Ladder:
    """The encoded rungs of one connection: fed decoded frames and the input's
    audio packets by the pipeline thread, each rung encoding on its own worker."""

    def __init__(self, renditions: list[EncodedRendition], video_in: av.video.stream.VideoStream,
                 audio_in: av.audio.stream.AudioStream | None, x264_preset: str) -> None:
        self.renditions = renditions
        self.audio = AudioLadder(audio_in, {r.preset.audio_bitrate for r in renditions}) \
            if audio_in is not None and renditions else None
        self.rungs = [RungEncoder(r, video_in, self.audio.streams[r.preset.audio_bitrate] if self.audio else None,
                                  x264_preset) for r in renditions]
        self._workers = [ThreadPoolExecutor(1, thread_name_prefix=f"rung-{r.name}") for r in renditions]
        self._queued: list[deque[Future]] = [deque() for _ in renditions]
        self.frame_rate = video_in.average_rate or video_in.guessed_rate

    def _submit(self, i: int, fn: Callable, *args) -> None:
        queued = self._queued[i]
        while queued and queued[0].done():
            queued.popleft().result()  # raises a worker's error here
        if len(queued) >= MAX_QUEUED_FRAMES:
            queued.popleft().result()
        queued.append(self._workers[i].submit(fn, *args))

    def video(self, frame: av.VideoFrame, starts: int | None) -> None:
        """A decoded frame, in presentation order; `starts`: the index of the
        segment it begins (it becomes an IDR in every rung)."""
        for i, rung in enumerate(self.rungs):
            self._submit(i, rung.encode_video, frame, starts)

    def audio_packet(self, packet: av.Packet | None) -> None:
        if self.audio is None:
            return
        for bitrate, packets in self.audio.feed(packet).items():
            if not packets:
                continue
            users = [i for i, r in enumerate(self.rungs) if r.rendition.preset.audio_bitrate == bitrate]
            for n, i in enumerate(users):
                # the last user takes the encoder's packets, the others copies
                mine = packets if n == len(users) - 1 else [copy_packet(p) for p in packets]
                self._submit(i, self.rungs[i].add_audio, mine)

    def complete(self, index: int) -> bool:
        """Whether every rung has finished segment `index`'s file."""
        return all(rung.last_done >= index for rung in self.rungs)

    def close_segment(self, segment: Segment) -> None:
        """List segment `index` (complete in every rung) in each playlist."""
        for rung, r in zip(self.rungs, self.renditions):
            r.codecs = rung.codecs or r.codecs
            r.frame_rate = self.frame_rate
            r.close_segment(segment, rung.done.pop(segment.index, False))

    def finish(self) -> None:
        """End of this connection: drain the audio and every encoder; waits."""
        self.audio_packet(None)
        for i, rung in enumerate(self.rungs):
            self._submit(i, rung.finish)
        self._wait()
        self._shutdown()

    def _wait(self) -> None:
        for queued in self._queued:
            while queued:
                queued.popleft().result()

    def abort(self) -> None:
        """After an error: stop the workers and close what is open."""
        for queued in self._queued:
            for fut in queued:
                fut.cancel()
        for worker in self._workers:
            worker.shutdown(wait=True)
        for rung in self.rungs:
            rung.abort()
        self._shutdown()

    def _shutdown(self) -> None:
        for worker in self._workers:
            worker.shutdown(wait=True)
        if self.audio is not None:
            self.audio.close()
            self.audio = None
