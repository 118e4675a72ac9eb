"""Recognising inputs by content, not by name.

`probe_video` opens a file with FFmpeg, decodes a first frame of its video
and demuxes its last seconds (a file cut short keeps its header's promises,
an mp4 index or a Matroska duration, but not its tail). Things FFmpeg reads as a
"video" but nobody means as one are refused: a lone picture (the image2 and
*_pipe demuxers turn a PNG or JPEG into a one-frame video), GIF, text drawn as
pictures (tty, bintext...), a cover picture in an audio file. Blocking: call
it in a thread (asyncio.to_thread).

`probe_image` names a picture's format from its first bytes (Pillow's names,
so `Image.open(..., formats=[name])` opens exactly what was recognised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import av.error

from ..errors import InputInvalid
from ..media.source import TEXT_CODECS, describe_av_error

# Demuxers that read pictures (plus every *_pipe one) and text, not video.
IMAGE_DEMUXERS = frozenset({"image2", "gif", "apng"})
TEXT_DEMUXERS = frozenset({"tty", "bintext", "xbin", "idf", "adf"})
FIRST_FRAME_PACKETS = 600  # video packets read for a first frame before giving up (a long open GOP is rare)
SUPPORTED_IMAGES = "JPEG, PNG, GIF, WebP, BMP or TIFF"


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None  # seconds, when the container says
    width: int
    height: int
    has_audio: bool
    container: str  # FFmpeg's format name


def _subject(field: str) -> str:
    """How a message names the input: "the file at inputUrl", "the video upload"."""
    return f"the file at {field}" if "url" in field.lower() else f"the {field} upload"


def _image_kind(container: av.container.InputContainer) -> str:
    name = container.format.name
    if name.endswith("_pipe"):
        return name[:-len("_pipe")].upper()
    stream = next(iter(container.streams.video), None)
    return (stream.codec_context.name if stream is not None and stream.codec_context else name).upper()


def _invalid(field: str, message: str, reason: str) -> InputInvalid:
    return InputInvalid(message, details={"field": field, "reason": reason})


def _is_image_demuxer(name: str) -> bool:
    return name in IMAGE_DEMUXERS or name.endswith("_pipe")


def _video_stream(container: av.container.InputContainer, field: str) -> av.video.stream.VideoStream:
    """The first stream that is real video; InputInvalid saying what the file holds instead."""
    found: list[str] = []
    for stream in container.streams.video:
        ctx = stream.codec_context
        if ctx is None:
            found.append("video in a codec with no decoder")
        elif ctx.name in TEXT_CODECS:
            found.append("text drawn as pictures")
        elif stream.disposition & av.stream.Disposition.attached_pic:
            found.append("a cover picture")
        else:
            return stream
    others = sorted({s.type for s in container.streams if s.type != "video"})
    contents = ", ".join(found + others) or "nothing"
    reason = "audio_only" if others == ["audio"] else "no_video"
    raise _invalid(field, f"{_subject(field)} has no video stream (it contains {contents})", reason)


def _frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            limit: int) -> Iterator[av.VideoFrame]:
    """Decoded frames of `stream` from where the container is, reading at most `limit` of its packets."""
    read = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            break
        read += 1
        yield from packet.decode()
        if read >= limit:
            return
    yield from stream.decode(None)


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 field: str, what: str) -> av.VideoFrame:
    try:
        frame = next(_frames(container, stream, FIRST_FRAME_PACKETS), None)
    except av.error.FFmpegError as exc:
        raise _invalid(field, f"{_subject(field)} looks truncated or corrupt: {what} cannot be decoded "
                              f"({describe_av_error(exc)})", "corrupt") from None
    if frame is None:
        raise _invalid(field, f"{_subject(field)} looks truncated or corrupt: {what} holds no decodable "
                              f"video frame", "corrupt")
    return frame


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if container.duration:
        return container.duration / av.time_base
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _video_span(container: av.container.InputContainer,
                stream: av.video.stream.VideoStream) -> tuple[float, float, float] | None:
    """(start, end, slack) of the video in seconds as the container announces
    it, or None; `slack` is how much earlier its packets may end: little for
    the video stream's own duration, more for the container's (audio may
    outlast the video)."""
    tb = stream.time_base
    if tb is not None and stream.duration:
        start = float((stream.start_time or 0) * tb)
        length = float(stream.duration * tb)
        return start, start + length, max(0.5, 0.05 * length)
    if container.duration:
        start = (container.start_time or 0) / av.time_base
        length = container.duration / av.time_base
        return start, start + length, max(2.0, 0.1 * length)
    return None


def _check_tail(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                field: str) -> None:
    """The video's packets reach (nearly) its announced end: a file cut short
    keeps its header's promises (an mp4 index, a Matroska duration) but not
    its tail. Demuxing only, from a seek near the end: cheap."""
    span = _video_span(container, stream)
    if span is None or stream.time_base is None:
        return
    start, end, slack = span
    target = max(start, end - slack - 1.0)
    try:
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        reached = None
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None:
                last = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                reached = last if reached is None else max(reached, last)
    except av.error.FFmpegError as exc:
        raise _invalid(field, f"{_subject(field)} looks truncated or corrupt: its end cannot be read "
                              f"({describe_av_error(exc)})", "corrupt") from None
    if reached is None or reached < end - slack:
        shown = "no video" if reached is None else f"video up to {reached - start:.1f} s"
        raise _invalid(field, f"{_subject(field)} looks truncated or corrupt: it announces {end - start:.1f} s "
                              f"of video but holds {shown}", "corrupt")


def probe_video(path: Path, *, field: str = "video") -> VideoInfo:
    """InputInvalid (400) unless `path` is a video file FFmpeg can decode.
    `field` names the input in the error (the upload field or inputUrl)."""
    try:
        size = path.stat().st_size
    except OSError:
        raise _invalid(field, f"{_subject(field)} cannot be read", "unreadable") from None
    if size == 0:
        raise _invalid(field, f"{_subject(field)} is empty", "empty")
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise _invalid(field, f"{_subject(field)} is not a video file (FFmpeg: {describe_av_error(exc)})",
                       "unreadable") from None
    try:
        fmt = container.format.name
        if fmt in TEXT_DEMUXERS:
            raise _invalid(field, f"{_subject(field)} is text, not a video", "text")
        if _is_image_demuxer(fmt):
            raise _invalid(field, f"{_subject(field)} is an image ({_image_kind(container)}), not a video",
                           "image")
        stream = _video_stream(container, field)
        ctx = stream.codec_context
        ctx.thread_count = 1  # a probe: one frame, no thread pool to start
        first = _first_frame(container, stream, field, "its video")
        duration = _duration(container, stream)
        _check_tail(container, stream, field)
        has_audio = bool(container.streams.audio)
        return VideoInfo(duration=duration, width=first.width, height=first.height, has_audio=has_audio,
                         container=fmt)
    finally:
        container.close()


# --- images --------------------------------------------------------------------------------------

_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})  # the DIB header variants


def image_format(data: bytes) -> str | None:
    """Pillow's name for the image format `data` starts with, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _what_instead(data: bytes) -> str:
    head = data[:512]
    mpegts = len(head) > 376 and head[0] == head[188] == head[376] == 0x47
    if head[4:8] == b"ftyp" or head[:4] in (b"\x1aE\xdf\xa3", b"FLV\x01") or mpegts:
        return "it looks like a video"
    if head.lstrip()[:1] == b"<":
        return "it looks like HTML or XML"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if printable >= 0.95 * len(head):
        return "it looks like text"
    return "its first bytes match none of them"


def probe_image(data: bytes, *, field: str = "image") -> str:
    """The format of an image by its magic bytes (JPEG, PNG, GIF, WEBP, BMP,
    TIFF: Pillow's names), or InputInvalid (400)."""
    if not data:
        raise _invalid(field, f"{_subject(field)} is empty", "empty")
    found = image_format(data)
    if found is None:
        raise _invalid(field, f"{_subject(field)} is not a supported image ({SUPPORTED_IMAGES}): "
                              f"{_what_instead(data)}", "not_image")
    return found
