"""Shape-real bundles for the benchmarks, and the reuse-bound check.

`shape_real_bundle(kind)` returns a bundle directory under bench/out/:
  fp32  the real ViT-B/32 image encoder architecture with random weights
        (`streamguard.inference.export.make_shape_real_bundle` when that
        exists; otherwise built here with the onnx helper API: patch conv
        32x32, class token, 12 pre-LN blocks of 12-head attention and a
        QuickGELU MLP of 3072, ln_post, projection to 512). Its text encoder
        is a random token table (prompts are encoded once per node, so their
        cost does not matter here). Not a model: it knows nothing.
  int8  the fp32 one through `streamguard.inference.quantize.quantize_bundle`
        (when that exists; until then ONNX Runtime's dynamic int8
        quantisation of the image encoder's MatMuls, done here).

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

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

WIDTH, LAYERS, HEADS, MLP, PATCH, SIZE, EMBED = 768, 12, 12, 3072, 32, 224, 512


def _vit_b32(path: Path, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []
    n = helper.make_node

    def w(name: str, shape: tuple, std: float = 0.02) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def c(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ln(x: str, name: str) -> str:
        nodes.append(n("LayerNormalization", [x, c(f"{name}_g", np.ones(WIDTH, np.float32)),
                                              c(f"{name}_b", np.zeros(WIDTH, np.float32))], [f"{name}_o"],
                       axis=-1, epsilon=1e-5))
        return f"{name}_o"

    def linear(x: str, name: str, din: int, dout: int) -> str:
        nodes.append(n("MatMul", [x, w(f"{name}_w", (din, dout))], [f"{name}_m"]))
        nodes.append(n("Add", [f"{name}_m", c(f"{name}_bias", np.zeros(dout, np.float32))], [f"{name}_o"]))
        return f"{name}_o"

    grid = SIZE // PATCH
    nodes += [
        n("Conv", ["pixel_values", w("patch_w", (WIDTH, 3, PATCH, PATCH))], ["patches"],
          kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH]),
        n("Reshape", ["patches", c("flat_shape", np.array([0, WIDTH, grid * grid], np.int64))], ["pflat"]),
        n("Transpose", ["pflat"], ["tokens"], perm=[0, 2, 1]),
        # the class token, broadcast to the batch: 0 * (first patch) + cls
        n("Slice", ["tokens", c("s0", np.array([0], np.int64)), c("s1", np.array([1], np.int64)),
                    c("s_ax", np.array([1], np.int64))], ["first"]),
        n("Mul", ["first", c("zero", np.array(0.0, np.float32))], ["zeros"]),
        n("Add", ["zeros", w("cls", (1, 1, WIDTH))], ["cls_b"]),
        n("Concat", ["cls_b", "tokens"], ["seq"], axis=1),
        n("Add", ["seq", w("pos", (1, grid * grid + 1, WIDTH))], ["x0"]),
    ]
    x = ln("x0", "ln_pre")
    heads_shape = c("heads_shape", np.array([0, 0, HEADS, WIDTH // HEADS], np.int64))
    merge_shape = c("merge_shape", np.array([0, 0, WIDTH], np.int64))
    scale = c("att_scale", np.array(1 / np.sqrt(WIDTH // HEADS), np.float32))
    gelu_k = c("gelu_k", np.array(1.702, np.float32))
    for i in range(LAYERS):
        p = f"l{i}"
        h = ln(x, f"{p}_ln1")
        qkv = linear(h, f"{p}_qkv", WIDTH, 3 * WIDTH)
        nodes.append(n("Split", [qkv], [f"{p}_q", f"{p}_k", f"{p}_v"], axis=-1, num_outputs=3))
        for t in "qkv":
            nodes.append(n("Reshape", [f"{p}_{t}", heads_shape], [f"{p}_{t}h"]))
        nodes += [
            n("Transpose", [f"{p}_qh"], [f"{p}_qt"], perm=[0, 2, 1, 3]),
            n("Transpose", [f"{p}_kh"], [f"{p}_kt"], perm=[0, 2, 3, 1]),
            n("Transpose", [f"{p}_vh"], [f"{p}_vt"], perm=[0, 2, 1, 3]),
            n("MatMul", [f"{p}_qt", f"{p}_kt"], [f"{p}_s"]),
            n("Mul", [f"{p}_s", scale], [f"{p}_ss"]),
            n("Softmax", [f"{p}_ss"], [f"{p}_a"], axis=-1),
            n("MatMul", [f"{p}_a", f"{p}_vt"], [f"{p}_ctx"]),
            n("Transpose", [f"{p}_ctx"], [f"{p}_ctxt"], perm=[0, 2, 1, 3]),
            n("Reshape", [f"{p}_ctxt", merge_shape], [f"{p}_merged"]),
        ]
        att = linear(f"{p}_merged", f"{p}_out", WIDTH, WIDTH)
        nodes.append(n("Add", [x, att], [f"{p}_x1"]))
        h = ln(f"{p}_x1", f"{p}_ln2")
        up = linear(h, f"{p}_fc", WIDTH, MLP)
        nodes += [n("Mul", [up, gelu_k], [f"{p}_gk"]), n("Sigmoid", [f"{p}_gk"], [f"{p}_gs"]),
                  n("Mul", [up, f"{p}_gs"], [f"{p}_gelu"])]
        down = linear(f"{p}_gelu", f"{p}_proj", MLP, WIDTH)
        nodes.append(n("Add", [f"{p}_x1", down], [f"{p}_x2"]))
        x = f"{p}_x2"
    nodes.append(n("Gather", [x, c("cls_index", np.array(0, np.int64))], ["cls_out"], axis=1))
    pooled = ln("cls_out", "ln_post")
    nodes.append(n("MatMul", [pooled, w("proj", (WIDTH, EMBED), WIDTH ** -0.5)], ["image_embeds"]))
    graph = helper.make_graph(
        nodes, "vit_b32_random",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", EMBED])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="streamguard-bench",
                              ir_version=9)
    onnx.save(model, str(path))


def _build_fp32(dest: Path) -> None:
    try:
        from streamguard.inference.export import make_shape_real_bundle  # the export helper's, when merged
    except ImportError:
        make_shape_real_bundle = None
    if make_shape_real_bundle is not None:
        make_shape_real_bundle(dest)
        return
    from streamguard.inference import testmodel
    from streamguard.inference.bundle import FileEntry, read_manifest, sha256_file, write_manifest

    testmodel.make_test_bundle(dest)  # tokenizer and prompt vocabulary
    manifest = read_manifest(dest)
    vocab = len(__import__("json").loads((dest / "tokenizer.json").read_text())["model"]["vocab"])
    table = (np.random.default_rng(1).standard_normal((vocab, EMBED)) * 0.1).astype(np.float32)
    testmodel._text_model(table, dest / "textual.onnx")
    _vit_b32(dest / "visual.onnx")
    manifest.name = "shape-real-vit-b-32"
    manifest.description = "shape-real ViT-B/32 image encoder with random weights (bench only; not a model)"
    manifest.embedding_dim = EMBED
    manifest.tokens_per_image = (SIZE // PATCH) ** 2 + 1
    for name in ("visual.onnx", "textual.onnx", "tokenizer.json"):
        manifest.files[name] = FileEntry(sha256=sha256_file(dest / name), size=(dest / name).stat().st_size)
    write_manifest(dest, manifest)


def _quantize_dynamic(src: Path, dest: Path) -> None:
    """Stand-in for `models quantize` until it is merged: ONNX Runtime's
    dynamic int8 quantisation of the image encoder (MatMul and Gemm weights),
    everything else copied."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from streamguard.inference.bundle import FileEntry, read_manifest, sha256_file, write_manifest

    dest.mkdir(parents=True)
    manifest = read_manifest(src)
    for name in (manifest.text.file, manifest.tokenizer.file):
        shutil.copy2(src / name, dest / name)
    quantize_dynamic(str(src / manifest.visual.file), str(dest / manifest.visual.file),
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    manifest.name += "-int8"
    for name in (manifest.visual.file, manifest.text.file, manifest.tokenizer.file):
        manifest.files[name] = FileEntry(sha256=sha256_file(dest / name), size=(dest / name).stat().st_size)
    write_manifest(dest, manifest)


def shape_real_bundle(kind: str = "fp32") -> Path:
    """The cached shape-real bundle of `kind` (fp32 or int8), built on first use."""
    fp32 = OUT / "shape-real-fp32"
    if not (fp32 / "manifest.json").exists():
        print("building the shape-real ViT-B/32 bundle (once) ...", file=sys.stderr)
        tmp = fp32.with_name(fp32.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build_fp32(tmp)
        tmp.rename(fp32)
    if kind == "fp32":
        return fp32
    if kind != "int8":
        raise SystemExit(f"unknown shape-real kind {kind!r}")
    int8 = OUT / "shape-real-int8"
    if not (int8 / "manifest.json").exists():
        try:
            from streamguard.inference.quantize import quantize_bundle
        except ImportError:
            quantize_bundle = _quantize_dynamic
        tmp = int8.with_name(int8.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        quantize_bundle(fp32, tmp)
        tmp.rename(int8)
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
