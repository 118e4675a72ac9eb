"""A CLIP-architecture bundle with random weights, built with the `onnx`
helper API (no torch): a ViT image encoder (patch conv, pre-LN transformer
blocks, QuickGELU MLP, projection) and a transformer text encoder over the
test bundle's tokenizer. `make_shape_real_bundle(dir)` gives ViT-B/32's
shapes and cost; `small=True` gives a tiny one for fast tests. For cost and
numerics checks only: it is not a model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamguard.inference.bundle import (EncoderSpec, FileEntry, Manifest, TextEncoderSpec, TokenizerSpec,
                                          read_manifest, sha256_file, write_manifest)
from streamguard.inference.testmodel import make_test_bundle


class _G:
    def __init__(self, seed: int) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, scale: float | None = None) -> str:
        scale = scale if scale is not None else shape[0] ** -0.5
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        return self.op("Add", [self.op("MatMul", [x, self.weight(d_in, d_out)]),
                               self.const(np.zeros(d_out, np.float32), "b")])

    def layernorm(self, x: str, width: int) -> str:
        return self.op("LayerNormalization", [x, self.const(np.ones(width, np.float32), "g"),
                                              self.const(np.zeros(width, np.float32), "b")], axis=-1)

    def block(self, x: str, width: int, heads: int) -> str:
        hd = width // heads
        h = self.layernorm(x, width)
        q, k, v = (self.op("Transpose", [self.op("Reshape", [self.linear(h, width, width),
                                                             self.const(np.array([0, 0, heads, hd], np.int64))])],
                           perm=perm) for perm in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
        att = self.op("Softmax", [self.op("Mul", [self.op("MatMul", [q, k]),
                                                  self.const(np.array(hd ** -0.5, np.float32))])], axis=-1)
        ctx = self.op("Reshape", [self.op("Transpose", [self.op("MatMul", [att, v])], perm=[0, 2, 1, 3]),
                                  self.const(np.array([0, 0, width], np.int64))])
        x = self.op("Add", [x, self.linear(ctx, width, width)])
        h = self.linear(self.layernorm(x, width), width, 4 * width)
        h = self.op("Mul", [h, self.op("Sigmoid", [self.op("Mul", [h, self.const(np.array(1.702, np.float32))])])])
        return self.op("Add", [x, self.linear(h, 4 * width, width)])

    def save(self, path: Path, name: str, inputs: list, output: str, out_name: str, out_dim: int) -> None:
        self.nodes.append(helper.make_node("Identity", [output], [out_name]))
        graph = helper.make_graph(self.nodes, name, inputs,
                                  [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", out_dim])],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnx.save(model, str(path))


def build_visual(path: Path, *, image_size: int = 224, patch: int = 32, width: int = 768, layers: int = 12,
                 heads: int = 12, out_dim: int = 512, seed: int = 0) -> None:
    g = _G(seed)
    grid = (image_size // patch) ** 2
    x = g.op("Conv", ["pixel_values", g.weight(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5)],
             strides=[patch, patch])
    x = g.op("Transpose", [g.op("Reshape", [x, g.const(np.array([0, width, grid], np.int64))])], perm=[0, 2, 1])
    # class token, broadcast over the batch without knowing it: 0 * first patch + cls
    first = g.op("Slice", [x, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                           g.const(np.array([1], np.int64))])
    cls = g.op("Add", [g.op("Mul", [first, g.const(np.array(0.0, np.float32))]), g.weight(1, 1, width, scale=0.02)])
    x = g.op("Add", [g.op("Concat", [cls, x], axis=1), g.weight(1, grid + 1, width, scale=0.02)])
    x = g.layernorm(x, width)
    for _ in range(layers):
        x = g.block(x, width, heads)
    x = g.layernorm(g.op("Gather", [x, g.const(np.array(0, np.int64))], axis=1), width)
    out = g.op("MatMul", [x, g.weight(width, out_dim)])
    g.save(path, "shape_real_visual",
           [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
           out, "image_embeds", out_dim)


def build_text(path: Path, *, vocab: int, context: int = 77, width: int = 512, layers: int = 12, heads: int = 8,
               out_dim: int = 512, seed: int = 1) -> None:
    g = _G(seed)
    x = g.op("Gather", [g.weight(vocab, width, scale=0.02), "input_ids"], axis=0)
    x = g.op("Add", [x, g.weight(context, width, scale=0.01)])
    for _ in range(layers):
        x = g.block(x, width, heads)
    x = g.layernorm(g.op("ReduceMean", [x], axes=[1], keepdims=0), width)
    out = g.op("MatMul", [x, g.weight(width, out_dim)])
    g.save(path, "shape_real_text",
           [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", context])],
           out, "text_embeds", out_dim)


def make_shape_real_bundle(out_dir: Path, *, small: bool = False) -> Path:
    """ViT-B/32 shapes (or a tiny config with `small`), the test tokenizer."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".test")
    make_test_bundle(tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp / "tokenizer.json", out_dir / "tokenizer.json")
    vocab = int(onnx.load(str(tmp / "textual.onnx")).graph.initializer[0].dims[0])
    shutil.rmtree(tmp)
    cfg = dict(width=64, layers=2, heads=4, out_dim=64) if small else {}
    tcfg = dict(width=64, layers=2, heads=4, out_dim=64) if small else {}
    build_visual(out_dir / "visual.onnx", **cfg)
    build_text(out_dir / "textual.onnx", vocab=vocab, **tcfg)
    dim = cfg.get("out_dim", 512)
    m = Manifest(name="shape-real-vit-b-32" + ("-small" if small else ""),
                 description="random weights, CLIP ViT-B/32 shapes: for cost measurement only (not a model)",
                 image_size=224, embedding_dim=dim, tokens_per_image=50,
                 visual=EncoderSpec(file="visual.onnx", input="pixel_values", output="image_embeds"),
                 text=TextEncoderSpec(file="textual.onnx", input="input_ids", output="text_embeds"),
                 tokenizer=TokenizerSpec(file="tokenizer.json", context_length=77, pad_id=0))
    for name in ("visual.onnx", "textual.onnx", "tokenizer.json"):
        m.files[name] = FileEntry(sha256=sha256_file(out_dir / name), size=(out_dir / name).stat().st_size)
    write_manifest(out_dir, m)
    read_manifest(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys
    make_shape_real_bundle(Path(sys.argv[1]), small="--small" in sys.argv)
