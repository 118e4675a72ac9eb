"""The sampler's crop-then-scale must match CLIP's reference preprocessing:
RGB, shorter side resized to 224 with PIL bicubic (longer side truncated, as
torchvision and Hugging Face do), centre crop."""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from streamguard.media.scaler import CentreCropScaler, crop_plan

SIZE = 224


def natural_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth shading, soft blobs and some fine texture: closer to camera
    footage than flat test patterns, so resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 80 + 60 * np.sin(x / (40 + 20 * c)) * np.cos(y / (55 + 10 * c))
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, min(width, height) / 4)
        colour = rng.uniform(0, 255, 3)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - mask) + colour * mask
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def yuv_frame(rgb: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def reference(frame: av.VideoFrame, sar: Fraction | None = None) -> np.ndarray:
    """What the reference pipeline does with this decoded frame."""
    img = frame.to_image()
    w, h = img.size
    dw = w * (sar or 1)
    short = min(dw, h)
    tw, th = max(SIZE, math.floor(dw * SIZE / short)), max(SIZE, math.floor(h * SIZE / short))
    img = img.resize((tw, th), Image.BICUBIC)
    x0, y0 = (tw - SIZE) // 2, (th - SIZE) // 2
    return np.asarray(img.crop((x0, y0, x0 + SIZE, y0 + SIZE)))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("width,height,sar", [
    (1280, 720, None),          # 16:9 landscape
    (1920, 1080, None),
    (480, 640, None),           # portrait
    (720, 576, Fraction(16, 11)),  # anamorphic PAL widescreen
    (640, 480, None),
    (200, 150, None),           # upscaled
])
def test_matches_reference_preprocessing(width: int, height: int, sar: Fraction | None) -> None:
    frame = yuv_frame(natural_image(width, height))
    ours = CentreCropScaler(SIZE)(frame, sar)
    ref = reference(frame, sar)
    assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.uint8
    err = mean_abs(ours, ref)
    # Different resamplers (swscale vs PIL) and chroma handling differ by
    # about a level; a crop one output pixel off-centre costs twice that.
    assert err < 1.6, err
    assert mean_abs(ref, np.roll(ref, 1, axis=1)) > 1.4 * err


def test_crop_plan_is_the_region_the_reference_keeps() -> None:
    # reference: resize to 398x224, crop x 87..311 -> source x 279.8..1000.2
    plan = crop_plan(1280, 720, SIZE)
    assert plan.resized == (398, 224) and plan.offset == (87, 0)
    assert plan.source == (280, 0, 720, 720) and plan.crop_first
    plan = crop_plan(480, 640, SIZE)  # 298 rows kept of 640 -> 224
    assert plan.resized == (224, 298) and plan.source == (0, 79, 480, 481) and not plan.crop_first
    plan = crop_plan(720, 576, SIZE, Fraction(16, 11))  # displays as 1047x576
    assert plan.resized == (407, 224) and plan.source == (161, 0, 396, 576)


def test_geometry_change_rebuilds_the_graph() -> None:
    scale = CentreCropScaler(SIZE)
    for w, h in ((1280, 720), (320, 240), (1920, 1080)):
        frame = yuv_frame(natural_image(w, h, seed=w))
        assert mean_abs(scale(frame), reference(frame)) < 1.6


@pytest.mark.parametrize("fmt", ["yuv420p10le", "nv12", "yuvj420p", "yuv444p", "rgb24"])
def test_other_pixel_formats(fmt: str) -> None:
    frame = av.VideoFrame.from_ndarray(natural_image(1280, 720), format="rgb24").reformat(format=fmt)
    assert mean_abs(CentreCropScaler(SIZE)(frame), reference(frame)) < 1.6
