"""Shape-real bundles for the benchmarks, and the reuse-bound check.

`shape_real_bundle(kind)` returns a bundle directory under bench/out/:
  fp32  the real ViT-B/32 architecture with random weights
        (`streamguard models export --random-init vit-b-32`, built once).
        Not a model: it knows nothing.
  int8  the fp32 one through `streamguard models quantize` (no cosine floor:
        how close random weights stay to fp32 says nothing about a real model).

    python bench/shape_real.py --check-reuse     # build fp32, then check the reuse bound on it

The check encodes pairs of sampled crops from x264-encoded static scenes
(consecutive 1 s samples, which pass the reuse test) and pairs that must not
pass (a red patch over 10 % of the frame, a scene cut), and prints the
embedding cosine and the largest score difference of each group.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from streamguard.inference.export import make_shape_real_bundle
from streamguard.inference.quantize import quantize_bundle

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SIZE = 224


def shape_real_bundle(kind: str = "fp32") -> Path:
    """The cached shape-real bundle of `kind` (fp32 or int8), built on first use."""
    fp32 = OUT / "shape-real-vit-b-32"
    if not (fp32 / "manifest.json").exists():
        print("exporting the shape-real ViT-B/32 bundle (once; about a minute) ...", file=sys.stderr)
    make_shape_real_bundle(fp32, "vit-b-32")
    if kind == "fp32":
        return fp32
    if kind != "int8":
        raise SystemExit(f"unknown shape-real kind {kind!r}")
    int8 = OUT / "shape-real-vit-b-32-int8"
    if not (int8 / "manifest.json").exists():
        print("quantizing it (once) ...", file=sys.stderr)
        shutil.rmtree(int8, ignore_errors=True)
        quantize_bundle(fp32, int8, min_cosine=-1.0)
    return int8


def check_reuse(bundle: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_reuse import encode, slide, with_red  # the test's static scenes (x264, sensor-like noise)

    import av

    from streamguard.analysis.reuse import nearly_identical
    from streamguard.analysis.scoring import ModerationScorer
    from streamguard.config import ModelSettings
    from streamguard.inference.clip import ClipModel
    from streamguard.media.scaler import CentreCropScaler

    def crops(path: Path) -> list[np.ndarray]:
        scale, out, next_t = CentreCropScaler(SIZE), [], 0.0
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            for f in c.decode(v):
                t = float(f.pts * v.time_base)
                if t >= next_t:
                    out.append(scale(f))
                    next_t += 1
        return out

    work = OUT / "reuse-check"
    work.mkdir(parents=True, exist_ok=True)
    passing, patch, cut = [], [], []
    for seed in range(1, 5):
        for noise in (0.0, 2.0, 4.0):
            s = slide(seed)
            cs = crops(encode(work / f"s{seed}-{noise}.mp4", [s] * 3 + [with_red(s, 0.1)], noise=noise))
            passing += [(cs[0], c) for c in cs[1:3] if nearly_identical(cs[0], c)]
            patch.append((cs[0], cs[3]))
            assert not nearly_identical(cs[0], cs[3])
    for a, b in zip(range(1, 5), range(2, 6)):
        cut.append((crops(work / f"s{a}-2.0.mp4")[0], crops(work / f"s{min(b, 4)}-0.0.mp4")[0]))
    model = ClipModel(bundle, ModelSettings(providers="cpu"), OUT / "cache")
    scorer = ModerationScorer(model, OUT / "cache")
    scorer.prepare()
    print(f"bundle {bundle.name}: {len(passing)} passing pairs (of {4 * 3 * 2})")
    for name, pairs in (("pass the reuse test", passing), ("red patch 10 %", patch), ("scene cut", cut)):
        pairs = [p for p in pairs if name != "scene cut" or not nearly_identical(*p)]
        a = model.encode_images(np.stack([p[0] for p in pairs]))
        b = model.encode_images(np.stack([p[1] for p in pairs]))
        cos = np.sum(a * b, axis=1)
        dscore = np.abs(scorer.score(a) - scorer.score(b)).max(axis=1)
        print(f"  {name:20s} n={len(pairs):2d}  cosine min {cos.min():.5f} mean {cos.mean():.5f}  "
              f"max score difference {dscore.max():.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--check-reuse", action="store_true")
    args = ap.parse_args()
    bundle = shape_real_bundle(args.kind)
    print(bundle)
    if args.check_reuse:
        check_reuse(bundle)


if __name__ == "__main__":
    main()
