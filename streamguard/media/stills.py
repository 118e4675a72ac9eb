"""Images and sampled video frames for standalone moderation: decoded off the
event loop and cropped exactly like stream frames (media/scaler.py: CLIP's
resize-shorter-side bicubic + centre crop), so an image and a video frame of
the same picture give the same embedding."""

from __future__ import annotations

import contextlib
import io
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image, ImageOps

from ..errors import InputInvalid
from ..inputs.sniff import probe_image, probe_video
from .scaler import CentreCropScaler

NEUTRAL_BACKGROUND = (128, 128, 128)  # alpha is composited on mid grey: no colour of its own


def spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over `count` (each the middle of its
    share); all of them when there are no more than `wanted`."""
    if count <= wanted:
        return list(range(count))
    return [int((i + 0.5) * count / wanted) for i in range(wanted)]


def _invalid(field: str, message: str, reason: str) -> InputInvalid:
    return InputInvalid(message, details={"field": field, "reason": reason})


def _rgb(frame: Image.Image) -> Image.Image:
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        rgba = frame.convert("RGBA")
        out = Image.new("RGB", rgba.size, NEUTRAL_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return frame.convert("RGB")


@contextlib.contextmanager
def _decoding(field: str, max_pixels: int) -> Iterator[None]:
    """Pillow's failures as InputInvalid (400) in the user's terms."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InputInvalid:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own check, at open
        raise _invalid(field, f"the image at {field} has more pixels than the {max_pixels} allowed",
                       "too_many_pixels") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _invalid(field, f"the image at {field} cannot be decoded: {exc}", "undecodable") from None


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open (header only) a supported image of at most `max_pixels` pixels."""
    probe_image(data, field=field)
    img = Image.open(io.BytesIO(data))  # reads the header only
    width, height = img.size
    if width * height > max_pixels:
        raise _invalid(field, f"the image at {field} is {width}x{height} pixels, more than the "
                              f"{max_pixels} allowed", "too_many_pixels")
    return img


def image_crops(data: bytes, size: int, *, max_frames: int, max_pixels: int,
                field: str = "inputUrl") -> list[np.ndarray]:
    """An image's crops (size x size x 3 RGB): one for a still, up to
    `max_frames` spread over an animation. EXIF orientation applied, alpha on
    a neutral background. InputInvalid (400) for what is not a supported image,
    is truncated, or has more than `max_pixels` pixels (checked from the header,
    before decoding). Blocking: call off the event loop."""
    with _decoding(field, max_pixels):
        img = _open(data, field, max_pixels)
        scaler = CentreCropScaler(size)
        crops = []
        for index in spread(getattr(img, "n_frames", 1), max_frames):
            img.seek(index)
            frame = _rgb(ImageOps.exif_transpose(img) if index == 0 else img)
            crops.append(scaler(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        return crops


def still_image(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """An image's first frame, decoded, EXIF orientation applied, RGBA (alpha
    kept: a logo's transparency is its caller's to place on backgrounds).
    Same refusals as image_crops. Blocking: call off the event loop."""
    with _decoding(field, max_pixels):
        img = _open(data, field, max_pixels)
        out = ImageOps.exif_transpose(img).convert("RGBA")
        out.load()
        return out


def video_crops(path: Path, size: int, *, max_frames: int, field: str = "inputUrl") -> list[tuple[float, np.ndarray]]:
    """Up to `max_frames` (time, crop) pairs spread evenly over a video's duration, each
    found by seeking to the keyframe before its time and decoding forward to
    it (not the whole file). InputInvalid (400) for what is not a video."""
    info = probe_video(path, field=field)
    duration = info.duration or 0.0
    times = [duration * (i + 0.5) / max_frames for i in range(max_frames)] if duration > 0 else [0.0]
    scaler = CentreCropScaler(size)
    out: list[tuple[float, np.ndarray]] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base or Fraction(1, 1000)
        start = float((stream.start_time or 0) * tb)
        for t in times:
            container.seek(int(t / tb) + (stream.start_time or 0), stream=stream, backward=True)
            frame = next((f for f in container.decode(stream) if f.time is None or f.time + 1e-3 >= t + start), None)
            if frame is None:
                continue
            shown = t if frame.time is None else frame.time - start  # the frame's own time, for the caller
            out.append((shown, scaler(frame, stream.sample_aspect_ratio)))
    if not out:
        raise _invalid(field, f"the video at {field} has no decodable frame", "undecodable")
    return out
