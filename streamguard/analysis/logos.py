"""Logo detection on sampled frames against a project's logo gallery
(CONTRACT §3, §6), on the CLIP image encoder the node already runs.

A logo can be small and anywhere in the frame, so detection looks at square
regions of the whole frame (not CLIP's centre square), each cropped from the
frame as decoded and run through CLIP's own preprocessing (a square crop
resized to the model's input with PIL bicubic, which is what CLIP's
resize-shorter-side + centre crop does to a square), through the shared
batcher with every other frame. Two passes per sampled frame:

1. coarse: squares of the frame's short side along its long side (the centre
   one is exactly the frame's own CLIP crop: its embedding is the frame's,
   not computed again) and a grid of half-side squares, overlapping by a
   quarter (`logos.coarse_stride`);
2. refine: around the coarse square most similar to a gallery logo, when it
   leans towards it (even when no region is a match yet: a region that holds
   part of a logo is closer to it than one that holds none), a grid of
   squares of 0.55 and 0.75 of its side (`logos.refine_steps`). With several
   logos leaning, a segment's frames take them in turn (`refine_target`);
   with none, there is no refine pass.

Scoring, per region and gallery logo: the best cosine to any of the logo's
reference embeddings (several augmentations of each reference image) is the
logo's similarity; the region's best cosine to a fixed background set
(synthetic plain, gradient, noise and checker images, embedded once per
model) is the background's. The logo's confidence is its share of the
softmax, at CLIP's logit scale, over the gallery's logos and the backgrounds:
a logo must beat the background and every other logo, as a moderation
category must beat the everyday scenes (scoring.py).

A region shows a logo when its confidence reaches `logos.min_confidence`.
Per frame and logo, the best region (highest margin of the logo's cosine over
the best competitor's) is kept and the positive regions overlapping it are
suppressed into it (non-maximum suppression) while refining its box: the box
is their margin-weighted mean, edge by edge, so regions that cover the logo
better weigh more, and the box is finer than the region grid. Across logos,
a weaker detection overlapping a stronger one (IoU >= 0.5) is dropped. A
segment reports each logo once, from its best frame.

Cost: every region is one image-encoder pass, billed as video tokens like a
frame. At 16:9 and the defaults: 17 coarse + 13 refine = 30 regions per
sampled frame at most, 31 passes with the frame itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..config import LogoSettings
from ..media.segmenter import fmt_time
from ..schemas import JobLogo, LogoBox, LogoDetection, LogoHit, LogoSummary
from .scoring import softmax

REFINE_SCALES = (0.55, 0.75)  # refine squares, as fractions of the coarse square's side
# ... when the coarse square already shows the logo (it fills half of it or
# more): larger squares, so the box is not made of squares smaller than the logo.
REFINE_SCALES_SHOWN = (0.75, 1.0)
GROUP_IOU = 0.2  # positive regions overlapping the best one this much are fused into it
NMS_IOU = 0.5
# A coarse square leans towards a logo when its cosine to it is this much
# above the logo's median over the frame's squares: worth a refine pass.
REFINE_LEAN = 0.02  # across logos: a weaker detection overlapping a stronger one this much is dropped
LIGHT, DARK = (245, 245, 245), (16, 16, 16)  # backgrounds for transparent reference images
NEGATIVES_VERSION = 1


@dataclass(frozen=True)
class Region:
    """A square of the frame, in frame pixels."""

    x: float
    y: float
    side: float

    def clamp(self, width: int, height: int) -> "Region":
        side = min(self.side, width, height)
        return Region(min(max(0.0, self.x), width - side), min(max(0.0, self.y), height - side), side)

    def iou(self, other: "Region") -> float:
        ox = max(0.0, min(self.x + self.side, other.x + other.side) - max(self.x, other.x))
        oy = max(0.0, min(self.y + self.side, other.y + other.side) - max(self.y, other.y))
        inter = ox * oy
        return inter / (self.side ** 2 + other.side ** 2 - inter)


def _steps(length: float, side: float, stride: float) -> list[float]:
    """Offsets of squares of `side` covering `length`, at most `stride` apart."""
    if length <= side:
        return [0.0]
    n = math.ceil((length - side) / stride - 1e-9) + 1
    return [float(v) for v in np.linspace(0.0, length - side, n)]


def coarse_regions(width: int, height: int, stride: float) -> tuple[list[Region], int]:
    """The coarse pass's squares, and the index of the one that is the frame's
    own CLIP centre crop (its embedding is the frame's)."""
    short, long = min(width, height), max(width, height)
    n = 1 if long == short else math.ceil(long / short) + 1
    n += 1 - n % 2  # odd: the middle one is the centre crop
    along = np.linspace(0.0, long - short, n)
    full = [Region(float(a), 0.0, short) if width >= height else Region(0.0, float(a), short) for a in along]
    half = short / 2
    grid = [Region(x, y, half) for y in _steps(height, half, stride * half) for x in _steps(width, half, stride * half)]
    return full + grid, n // 2


def refine_regions(around: Region, width: int, height: int, steps: int, shown: bool = False) -> list[Region]:
    """The refine pass's squares around a coarse square (`shown`: that square
    is itself a detection)."""
    out = []
    cx, cy = around.x + around.side / 2, around.y + around.side / 2
    for scale, n in zip(REFINE_SCALES_SHOWN if shown else REFINE_SCALES, (steps, steps - 1)):
        if n <= 0:
            continue
        side = scale * around.side
        offsets = np.linspace(-around.side / 2, around.side / 2 - side, n) if n > 1 else np.array([-side / 2])
        out += [Region(cx + float(dx), cy + float(dy), side).clamp(width, height)
                for dy in offsets for dx in offsets]
    return out


def crop_square(frame: np.ndarray, region: Region, size: int) -> np.ndarray:
    """A square region of an RGB frame as the model's input (size x size x 3
    uint8): CLIP's preprocessing of that crop (PIL bicubic, as CLIP's own)."""
    x, y, s = round(region.x), round(region.y), max(1, round(region.side))
    h, w = frame.shape[:2]
    x, y = min(max(0, x), max(0, w - s)), min(max(0, y), max(0, h - s))
    img = Image.fromarray(np.ascontiguousarray(frame[y:y + s, x:x + s]))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def square_image(img: Image.Image, background: tuple[int, int, int], scale: float = 1.0) -> Image.Image:
    """An image (RGBA or RGB) centred on a square canvas of `background`, its
    longer side `scale` of the canvas: a logo of any shape seen whole."""
    rgba = img.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGB", (side, side), background)
    if scale != 1.0:
        rgba = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))),
                           Image.Resampling.BICUBIC)
    canvas.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2), rgba.getchannel("A"))
    return canvas


def reference_views(img: Image.Image, size: int) -> list[np.ndarray]:
    """The augmented views of one reference image (model inputs): whole, on a
    light and on a dark background (they differ for transparent logos), scaled
    to 80 % of a square (a logo with a margin around it), and centre crops of
    85 % (a logo cut a little by its region). The first is the plain view."""
    def fit(im: Image.Image) -> np.ndarray:
        return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))

    views = []
    for bg in (LIGHT, DARK):
        whole = square_image(img, bg)
        side = whole.width
        inner = round(side * 0.85)
        off = (side - inner) // 2
        views += [fit(whole), fit(square_image(img, bg, 0.8)), fit(whole.crop((off, off, off + inner, off + inner)))]
    return views


def keep_views(embeddings: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The views to keep as references: the plain one always, an augmented one
    only while it is still closer to the plain view than to any background
    (a view that no longer looks like the logo would match background)."""
    base = embeddings[0]
    near_bg = (embeddings @ negatives.T).max(axis=1) if len(negatives) else np.full(len(embeddings), -1.0)
    keep = embeddings @ base > near_bg
    keep[0] = True
    return embeddings[keep]


def background_images(size: int) -> list[np.ndarray]:
    """The fixed background set: plain black, white and greys, grey gradients,
    a checkerboard and seeded grey and colour noise."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    grey = lambda a: np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    yy, xx = np.mgrid[0:size, 0:size]
    return [
        np.full((size, size, 3), v, np.uint8) for v in (0, 64, 128, 192, 255)
    ] + [
        grey(np.tile(ramp, (size, 1))), grey(np.tile(ramp[:, None], (1, size))),
        grey((((yy // 28) + (xx // 28)) % 2) * 255.0),
        grey(rng.integers(0, 256, (size, size))),
        rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
    ]


class BackgroundSet:
    """The background embeddings of one model, computed once and cached on
    disk by the model's fingerprint."""

    def __init__(self, fingerprint: str, cache_dir: Path, size: int) -> None:
        key = hashlib.sha256(json.dumps([NEGATIVES_VERSION, size]).encode()).hexdigest()[:12]
        self.path = Path(cache_dir) / "logos" / f"{fingerprint}-backgrounds-{key}.npy"
        self.size = size
        self._emb: np.ndarray | None = None
        self._lock = threading.Lock()

    def get(self, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Blocking (encodes on first use): call off the event loop."""
        with self._lock:
            if self._emb is None:
                if self.path.is_file():
                    self._emb = np.load(self.path)
                else:
                    self._emb = encode(np.stack(background_images(self.size)))
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.path.with_suffix(".tmp.npy")
                    np.save(tmp, self._emb)
                    tmp.replace(self.path)
            return self._emb


@dataclass(frozen=True)
class GalleryLogo:
    id: str
    name: str
    references: np.ndarray  # [R, D] normalised embeddings (views of its images)


class Gallery:
    """A snapshot of one project's gallery, ready to score regions. Immutable."""

    def __init__(self, logos: Sequence[GalleryLogo], backgrounds: np.ndarray, scale: float) -> None:
        logos = [lg for lg in logos if len(lg.references)]
        self.ids = tuple(lg.id for lg in logos)
        self.names = tuple(lg.name for lg in logos)
        self.refs = np.concatenate([lg.references for lg in logos]) if logos else np.zeros((0, backgrounds.shape[1]), np.float32)
        sizes = [len(lg.references) for lg in logos]
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if logos else np.zeros(0, np.int64)
        self.backgrounds = backgrounds
        self.scale = scale

    def __len__(self) -> int:
        return len(self.ids)

    def similarity(self, emb: np.ndarray) -> np.ndarray:
        """[M, D] region embeddings -> [M, L]: each logo's best cosine over its references."""
        return np.maximum.reduceat(emb @ self.refs.T, self.starts, axis=1)

    def score(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[M, D] region embeddings -> (confidence, margin), each [M, L]:
        each logo's softmax share against the backgrounds and the other
        logos, and its cosine over the best competitor's."""
        sims = self.similarity(emb)
        bg = (emb @ self.backgrounds.T)  # [M, K]
        conf = softmax(self.scale * np.concatenate([sims, bg], axis=1), axis=1)[:, :len(self)]
        rival = bg.max(axis=1, keepdims=True)
        if len(self) > 1:
            order = np.sort(sims, axis=1)
            best, second = order[:, -1:], order[:, -2:-1]
            others = np.where(sims >= best, second, best)  # the best other logo's cosine
            rival = np.maximum(rival, others)
        return conf, sims - rival


@dataclass(frozen=True)
class FrameHit:
    logo: int  # index in the gallery
    confidence: float
    box: tuple[float, float, float, float]  # x, y, width, height in frame pixels


def detect_frame(regions: Sequence[Region], conf: np.ndarray, margin: np.ndarray,
                 min_confidence: float) -> list[FrameHit]:
    """The logos a frame shows, from its scored regions (see the module doc)."""
    hits = []
    for logo in range(conf.shape[1]):
        positive = np.flatnonzero(conf[:, logo] >= min_confidence)
        if not len(positive):
            continue
        top = positive[np.argmax(margin[positive, logo])]
        group = [i for i in positive if regions[i].iou(regions[top]) >= GROUP_IOU]
        w = np.maximum(margin[group, logo], 1e-6)
        xs = np.array([regions[i].x for i in group])
        ys = np.array([regions[i].y for i in group])
        sides = np.array([regions[i].side for i in group])
        x0, y0 = np.average(xs, weights=w), np.average(ys, weights=w)
        x1, y1 = np.average(xs + sides, weights=w), np.average(ys + sides, weights=w)
        hits.append(FrameHit(logo, float(conf[group, logo].max()), (float(x0), float(y0), float(x1 - x0), float(y1 - y0))))
    hits.sort(key=lambda h: -h.confidence)
    kept: list[FrameHit] = []
    for hit in hits:
        if all(_box_iou(hit.box, k.box) < NMS_IOU for k in kept):
            kept.append(hit)
    return kept


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ox = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    oy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ox * oy
    return inter / max(1e-9, a[2] * a[3] + b[2] * b[3] - inter)


@dataclass
class FrameProbe:
    """One sampled frame's logo work: its frame (RGB, kept for the refine
    pass), its coarse regions and their embeddings' futures (the centre one
    is the frame's own)."""

    index: int  # the sampled frame's index within its segment
    time: Fraction
    frame: np.ndarray
    regions: list[Region]
    futures: list[Future]
    encoded: int  # regions run through the encoder for it so far
    shape: tuple[int, int] = (0, 0)  # the frame's height, width (kept after release)

    def __post_init__(self) -> None:
        self.shape = self.frame.shape[:2]

    def release(self) -> None:
        self.frame = np.zeros((0, 0, 3), np.uint8)

    def cancel(self) -> None:
        """Withdraw its regions from inference (the task ended)."""
        for fut in self.futures:
            fut.cancel()
        self.release()


class LogoDetector:
    """Region proposals, scoring and aggregation, on the shared batcher."""

    def __init__(self, submit: Callable[[np.ndarray], Future], size: int, settings: LogoSettings,
                 on_regions: Callable[[int, int], None] | None = None) -> None:
        self.submit = submit
        self.size = size
        self.settings = settings
        self.on_regions = on_regions  # (regions run for a segment, the most for one of its frames)

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The size frames are kept at for logos: at most the configured long
        and short side, never upscaled, the aspect ratio kept (even sizes)."""
        s = self.settings
        long, short = max(width, height), min(width, height)
        f = min(1.0, s.max_frame_long_side / long, s.max_frame_short_side / short)
        return max(2, round(width * f / 2) * 2), max(2, round(height * f / 2) * 2)

    def probe(self, index: int, time: Fraction, frame: np.ndarray, full: Future) -> FrameProbe:
        """Start a frame's coarse pass (ingest thread): its regions go to the
        batcher now; `full` is the frame's own embedding (the centre square)."""
        h, w = frame.shape[:2]
        regions, centre = coarse_regions(w, h, self.settings.coarse_stride)
        futures = [full if i == centre else self.submit(crop_square(frame, r, self.size))
                   for i, r in enumerate(regions)]
        return FrameProbe(index, time, frame, regions, futures, len(regions) - 1)

    def _refine(self, probe: FrameProbe, around: Region, shown: bool) -> list[tuple[Region, Future]]:
        """Submit the refine pass's crops (blocking crop work: off the loop)."""
        h, w = probe.frame.shape[:2]
        regions = refine_regions(around, w, h, self.settings.refine_steps, shown)
        return [(r, self.submit(crop_square(probe.frame, r, self.size))) for r in regions]

    def _refine_around(self, probe: FrameProbe, emb: np.ndarray, gallery: Gallery,
                       target: int) -> tuple[Region, bool]:
        """Where the refine pass looks: the target coarse square; or, when
        coarse squares already show a logo there, a square of the same side
        centred on their fused box (a large logo can reach past the target)."""
        region = probe.regions[target]
        conf, margin = gallery.score(emb)
        logo = int(np.argmax(conf[target]))
        if conf[target, logo] < self.settings.min_confidence:
            return region, False
        hits = detect_frame(probe.regions, conf[:, logo:logo + 1], margin[:, logo:logo + 1],
                            self.settings.min_confidence)
        if hits:
            x, y, w, h = hits[0].box
            height, width = probe.frame.shape[:2]
            region = Region(x + w / 2 - region.side / 2, y + h / 2 - region.side / 2, region.side).clamp(width, height)
        return region, True

    async def detect(self, probes: list[FrameProbe], gallery: Gallery,
                     gather: Callable[[list[Future]], object]) -> list[list[FrameHit]]:
        """Per probe, the logos its frame shows. `gather` awaits futures
        (analyzer.gather_threadsafe). Frees each probe's frame when done."""
        loop = asyncio.get_running_loop()
        flat = [f for p in probes for f in p.futures]
        coarse = np.stack(await gather(flat)) if flat else np.zeros((0, gallery.backgrounds.shape[1]), np.float32)
        out: list[list[FrameHit]] = []
        offset = 0
        pending = []
        for p in probes:
            emb = coarse[offset:offset + len(p.regions)]
            offset += len(p.regions)
            target = refine_target(p, gallery.similarity(emb))
            refine = []
            if target is not None and self.settings.refine_steps:
                around, shown = self._refine_around(p, emb, gallery, target)
                refine = await loop.run_in_executor(None, self._refine, p, around, shown)
            p.encoded += len(refine)
            pending.append((p, emb, refine))
        for p, emb, refine in pending:
            regions = list(p.regions)
            if refine:
                regions += [r for r, _ in refine]
                emb = np.concatenate([emb, np.stack(await gather([f for _, f in refine]))])
            conf, margin = gallery.score(emb)
            out.append(detect_frame(regions, conf, margin, self.settings.min_confidence))
            p.release()
        if self.on_regions is not None and probes:
            self.on_regions(sum(p.encoded for p in probes), max(p.encoded for p in probes))
        return out


def refine_target(probe: FrameProbe, sims: np.ndarray) -> int | None:
    """The coarse square the refine pass looks around: per logo, its most
    similar square if it leans towards that logo (its cosine to the logo at
    least REFINE_LEAN above the logo's median over the frame's squares; the
    cosine, not the margin over the backgrounds: a square merely unlike every
    background is no nearer the logo); with several logos
    leaning, the frames of a segment take them in turn (best first), so each
    gets refined within the per-frame budget. None when nothing leans: no
    refine pass (a frame with nothing like a logo costs the coarse pass only)."""
    candidates: dict[int, float] = {}
    for logo in range(sims.shape[1]):
        col = sims[:, logo]
        best = int(np.argmax(col))
        if col[best] - float(np.median(col)) >= REFINE_LEAN:
            candidates[best] = max(candidates.get(best, -np.inf), float(col[best]))
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda i: -candidates[i])
    return ranked[probe.index % len(ranked)]


def segment_logos(probes: list[FrameProbe], hits: list[list[FrameHit]], gallery: Gallery | None,
                  frames: int, max_logos: int) -> LogoDetection:
    """The record's `logo_detection`: one entry per logo seen in the segment
    (its best frame), highest confidence first, at most `max_logos`; the box
    normalised to the frame."""
    best: dict[int, tuple[FrameHit, FrameProbe]] = {}
    for probe, frame_hits in zip(probes, hits):
        for hit in frame_hits:
            if hit.logo not in best or hit.confidence > best[hit.logo][0].confidence:
                best[hit.logo] = (hit, probe)
    entries = []
    for logo, (hit, probe) in sorted(best.items(), key=lambda kv: -kv[1][0].confidence)[:max_logos]:
        assert gallery is not None
        entries.append(LogoHit(name=gallery.names[logo], logo_id=gallery.ids[logo],
                               confidence=round(hit.confidence, 4), bbox=normalised(hit.box, probe),
                               frame_index=probe.index, time=fmt_time(probe.time)))
    return LogoDetection(has_logo=bool(entries), logos=entries, frames_processed=frames)


def normalised(box: tuple[float, float, float, float], probe: FrameProbe) -> LogoBox:
    h, w = probe.shape
    x, y, bw, bh = box
    return LogoBox(x=round(x / w, 4), y=round(y / h, 4), width=round(bw / w, 4), height=round(bh / h, 4))


class LogoTally:
    """Logo detections over many segments (a file job): per logo its best
    sighting and the segments it was seen in; `summary()` is the job's
    `logoDetection`."""

    def __init__(self) -> None:
        self.frames = 0  # sampled frames of the segments added so far
        self.best: dict[str, tuple[LogoHit, int, int]] = {}  # logo id -> (hit, job frame index, segment)
        self.segments: dict[str, int] = {}

    def add(self, segment_index: int, detection: LogoDetection) -> None:
        for hit in detection.logos:
            self.segments[hit.logo_id] = self.segments.get(hit.logo_id, 0) + 1
            held = self.best.get(hit.logo_id)
            if held is None or hit.confidence > held[0].confidence:
                self.best[hit.logo_id] = (hit, self.frames + hit.frame_index, segment_index)
        self.frames += detection.frames_processed

    def summary(self, max_logos: int) -> LogoSummary:
        ranked = sorted(self.best.items(), key=lambda kv: -kv[1][0].confidence)[:max_logos]
        logos = [JobLogo(name=hit.name, logoId=logo_id, confidence=hit.confidence, bbox=hit.bbox,
                         frameIndex=frame, time=float(hit.time), segmentIndex=segment,
                         segments=self.segments[logo_id])
                 for logo_id, (hit, frame, segment) in ranked]
        return LogoSummary(hasLogo=bool(logos), logos=logos, framesAnalyzed=self.frames)


class GallerySource:
    """Where a task's gallery comes from. `ready()` (any thread, never
    blocks): whether there are logos to look for now, so a task whose project
    has none runs no region; `current()` (event loop): the gallery to score with."""

    def ready(self) -> bool:
        raise NotImplementedError

    async def current(self) -> Gallery | None:
        raise NotImplementedError


class StaticGallery(GallerySource):
    """A gallery fixed for the whole run (`scan --logo NAME=IMAGE`)."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def ready(self) -> bool:
        return len(self.gallery) > 0

    async def current(self) -> Gallery | None:
        return self.gallery

