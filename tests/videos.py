"""Test videos generated with PyAV: a moving pattern, saturated red or green where asked."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np


def pattern_frame(i: int, width: int, height: int, red: bool, green: bool = False) -> np.ndarray:
    if red or green:
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 0 if red else 1] = 255
        return img
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x + 3 * i) % 256 // 2  # never saturated red
    img[..., 1] = (y + 2 * i) % 256
    img[..., 2] = ((x + y) // 2 + i) % 256
    return img


def make_video(path: Path, *, seconds: float = 20, fps: int = 25, width: int = 320, height: int = 240,
               gop: int | None = None, red: tuple[tuple[float, float], ...] = (),
               green: tuple[tuple[float, float], ...] = (), audio: bool = True,
               bframes: int = 2, codec: str = "libx264", preset: str = "ultrafast",
               encoder_threads: int = 1, frames: Callable[[int], np.ndarray] | None = None) -> Path:
    """H.264 (+AAC) file; keyframes every `gop` frames exactly (no scene cuts).
    `frames` draws frame i itself (RGB, height x width x 3) instead of the pattern."""
    gop = gop or 2 * fps
    out = av.open(str(path), "w")
    v = out.add_stream(codec, rate=fps)
    v.width, v.height, v.pix_fmt = width, height, "yuv420p"
    # One encoder thread (the default): byte-identical output on every run and machine.
    v.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bframes),
                 "preset": preset, "threads": str(encoder_threads),
                 "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
    a = None
    if audio:
        a = out.add_stream("aac", rate=48000)
        a.layout = "mono"
    n = int(round(seconds * fps))
    samples_per_frame = 48000 // fps
    audio_pts = 0
    for i in range(n):
        t = i / fps
        is_red = any(lo <= t < hi for lo, hi in red)
        is_green = any(lo <= t < hi for lo, hi in green)
        picture = frames(i) if frames is not None else pattern_frame(i, width, height, is_red, is_green)
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts = i
        frame.time_base = Fraction(1, fps)
        for packet in v.encode(frame):
            out.mux(packet)
        if a is not None:
            tone = (0.1 * np.sin(2 * np.pi * 440 * (audio_pts + np.arange(samples_per_frame)) / 48000))
            af = av.AudioFrame.from_ndarray(tone.astype(np.float32).reshape(1, -1), format="fltp", layout="mono")
            af.sample_rate = 48000
            af.pts = audio_pts
            audio_pts += samples_per_frame
            for packet in a.encode(af):
                out.mux(packet)
    for stream in (v, a):
        if stream is not None:
            for packet in stream.encode(None):
                out.mux(packet)
    out.close()
    return path
