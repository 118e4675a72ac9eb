"""Bundles whatever their export: variants of the test bundle's graphs (fixed
batch of 1, int32 ids, an attention mask, other tensor names) load and score
the same; broken bundles are refused at load with one line, and `scan` /
`serve` report that line at start."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from streamguard.analysis.categories import CATEGORY_NAMES
from streamguard.analysis.scoring import ModerationScorer
from streamguard.config import ModelSettings, Settings
from streamguard.errors import ModelError
from streamguard.inference.bundle import FileEntry, read_manifest, sha256_file, write_manifest
from streamguard.inference.clip import ClipModel
from streamguard.inference.testmodel import EMBED_DIM

from test_model_scoring import frames_with_red_fraction


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for vi in [*graph.input, *graph.output]:
        if vi.name == old:
            vi.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _edit(bundle: Path, file: str, edit) -> None:
    """Apply `edit` to one graph and re-record its checksum, as an exporter would."""
    model = onnx.load(str(bundle / file))
    edit(model.graph)
    onnx.save(model, str(bundle / file))
    m = read_manifest(bundle)
    m.files[file] = FileEntry(sha256=sha256_file(bundle / file), size=(bundle / file).stat().st_size)
    write_manifest(bundle, m)


def _set_manifest(bundle: Path, **changes) -> None:
    m = read_manifest(bundle)
    for path, value in changes.items():
        obj = m
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    write_manifest(bundle, m)


def _fix_batch(graph: onnx.GraphProto, size: int) -> None:
    for vi in [*graph.input, *graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = size


def _scores(model: ClipModel, cache: Path) -> np.ndarray:
    frames = frames_with_red_fraction([1.0, 0.7, 0.45, 0.0, 1.0])
    return ModerationScorer(model, cache).score(model.encode_images(frames))


@pytest.fixture(scope="module")
def reference(test_bundle: Path, tmp_path_factory) -> np.ndarray:
    return _scores(ClipModel(test_bundle, ModelSettings(providers="cpu"), tmp_path_factory.mktemp("c")),
                   tmp_path_factory.mktemp("s"))


def _variant_batch1(b: Path) -> None:
    _edit(b, "visual.onnx", lambda g: _fix_batch(g, 1))
    _edit(b, "textual.onnx", lambda g: _fix_batch(g, 1))


def _variant_int32_ids(b: Path) -> None:
    def edit(g: onnx.GraphProto) -> None:
        g.input[0].type.tensor_type.elem_type = TensorProto.INT32
    _edit(b, "textual.onnx", edit)
    _set_manifest(b, text__input_dtype="int64")  # the manifest is wrong; the graph decides


def _variant_attention_mask(b: Path) -> None:
    def edit(g: onnx.GraphProto) -> None:
        # ids * mask: the mask really matters (ids of padding would still be 0).
        g.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 77]))
        _rename(g, "input_ids", "raw_ids")
        g.input[0].name = "input_ids"
        g.node.insert(0, helper.make_node("Mul", ["input_ids", "attention_mask"], ["raw_ids"]))
    _edit(b, "textual.onnx", edit)  # the manifest does not name the mask


def _variant_other_names(b: Path) -> None:
    _edit(b, "visual.onnx", lambda g: (_rename(g, "pixel_values", "image"), _rename(g, "image_embeds", "out")))
    _edit(b, "textual.onnx", lambda g: (_rename(g, "input_ids", "text"), _rename(g, "text_embeds", "emb")))
    # The manifest still names the old tensors: wrong, but the graphs leave no doubt.


def _variant_names_left_empty(b: Path) -> None:
    _set_manifest(b, visual__input="", visual__output="", text__input="", text__output="")


VARIANTS = {"batch1": _variant_batch1, "int32_ids": _variant_int32_ids, "attention_mask": _variant_attention_mask,
            "other_names": _variant_other_names, "names_left_empty": _variant_names_left_empty}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_variants_load_and_score_the_same(variant, test_bundle, reference, tmp_path):
    b = _copy(test_bundle, tmp_path / "b")
    VARIANTS[variant](b)
    model = ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")
    assert np.allclose(_scores(model, tmp_path / "s"), reference, atol=1e-5)
    v = CATEGORY_NAMES.index("violence")
    assert reference[0, v] >= 0.9 and reference[4, v] >= 0.9 and (reference[2:4] < 0.1).all()


def test_mask_is_fed_only_when_the_graph_takes_one(test_bundle, tmp_path):
    b = _copy(test_bundle, tmp_path / "b")
    _set_manifest(b, text__attention_mask="attention_mask")  # names a mask the graph does not take
    model = ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")
    emb, tokens = model.encode_texts(["a photo of violence"])
    assert emb.shape == (1, EMBED_DIM) and tokens > 0


def _broken(test_bundle: Path, tmp_path: Path, how: str) -> Path:
    b = _copy(test_bundle, tmp_path / how)
    if how == "missing_file":
        (b / "textual.onnx").unlink()
    elif how == "truncated":
        data = (b / "visual.onnx").read_bytes()
        (b / "visual.onnx").write_bytes(data[:-10])
    elif how == "bad_checksum":
        data = bytearray((b / "visual.onnx").read_bytes())
        data[-1] ^= 0xFF
        (b / "visual.onnx").write_bytes(bytes(data))
    elif how == "unreadable_onnx":  # no checksums recorded: ONNX Runtime is the first to notice
        (b / "visual.onnx").write_bytes(b"not an onnx file")
        _set_manifest(b, files={})
    elif how == "image_size":
        _set_manifest(b, image_size=256)
    elif how == "embedding_dim":
        _set_manifest(b, embedding_dim=64)
    elif how == "open_width":  # metadata says nothing of the width: the probe run finds it
        _set_manifest(b, embedding_dim=48)
        def open_width(g: onnx.GraphProto) -> None:
            # Reshape to a shape computed at run time: no metadata says the width.
            inp, out = g.input[0].name, g.output[0].name
            _rename(g, out, "fixed")
            g.output[0].name = out
            g.output[0].type.tensor_type.shape.dim[1].dim_param = "width"
            g.initializer.extend([onnx.numpy_helper.from_array(np.array([0], np.int64), "z0"),
                                  onnx.numpy_helper.from_array(np.array([1], np.int64), "z1"),
                                  onnx.numpy_helper.from_array(np.array([-1], np.int64), "m1")])
            g.node.extend([helper.make_node("Shape", [inp], ["pshape"]),
                           helper.make_node("Slice", ["pshape", "z0", "z1"], ["n"]),
                           helper.make_node("Concat", ["n", "m1"], ["oshape"], axis=0),
                           helper.make_node("Reshape", ["fixed", "oshape"], [out])])
        _edit(b, "visual.onnx", open_width)
        _edit(b, "textual.onnx", open_width)
        _set_manifest(b, embedding_dim=48)
    elif how == "ambiguous_names":
        def two_outputs(g: onnx.GraphProto) -> None:
            g.output.append(helper.make_tensor_value_info("frac", TensorProto.FLOAT, ["batch", 1]))
            g.output.append(helper.make_tensor_value_info("embeds2", TensorProto.FLOAT, ["batch", EMBED_DIM]))
            g.node.append(helper.make_node("Identity", ["out"], ["embeds2"]))
            _rename(g, "image_embeds", "out")
        _edit(b, "visual.onnx", two_outputs)
    else:
        raise AssertionError(how)
    return b


BROKEN = {"missing_file": "missing textual.onnx", "truncated": "visual.onnx is .* bytes, the manifest says",
          "bad_checksum": "checksum mismatch for visual.onnx", "unreadable_onnx": "cannot load ONNX model",
          "image_size": r"expected \[N, 3, 256, 256\]",
          "embedding_dim": f"{EMBED_DIM} wide but the manifest's embedding_dim is 64",
          "open_width": rf"gives shape \[1, {EMBED_DIM}\] for 1 input\(s\), expected \[1, 48\]",
          "ambiguous_names": "cannot tell which output to use"}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_broken_bundle_is_one_clear_line(how, test_bundle, tmp_path):
    b = _broken(test_bundle, tmp_path, how)
    with pytest.raises(ModelError, match=BROKEN[how]) as info:
        ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")
    assert "\n" not in info.value.message and str(b) in info.value.message


def test_checksums_are_verified_once_then_remembered(test_bundle, tmp_path, monkeypatch):
    from streamguard.inference import bundle as bundle_mod
    b = _copy(test_bundle, tmp_path / "b")
    ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")
    hashed = []
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a: hashed.append(p) or "x")
    ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")
    assert hashed == []  # same size and mtime: trusted from the cache
    data = bytearray((b / "visual.onnx").read_bytes())
    data[-1] ^= 0xFF
    (b / "visual.onnx").write_bytes(bytes(data))  # replaced: hashed again, and refused
    monkeypatch.undo()
    with pytest.raises(ModelError, match="checksum mismatch"):
        ClipModel(b, ModelSettings(providers="cpu"), tmp_path / "cache")


def test_scan_with_broken_bundle_exits_1_with_one_line(cli, test_bundle, tmp_path):
    b = _broken(test_bundle, tmp_path, "bad_checksum")
    res = cli("scan", tmp_path / "none.mp4", "--moderate", "--model", b, "--data-dir", tmp_path / "d")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamguard: error: model bundle"), res.stderr
    assert "checksum mismatch for visual.onnx" in lines[0] and res.stdout == ""


def test_serve_with_broken_bundle_logs_one_clear_line(test_bundle, tmp_path, caplog):
    from streamguard.metrics import Metrics
    from streamguard.runtime import load_analyzer
    b = _broken(test_bundle, tmp_path, "image_size")
    settings = msgspec.convert({"storage": {"data_dir": str(tmp_path / "d")}, "model": {"providers": "cpu"}},
                               Settings)
    analyzer, reason = asyncio.run(load_analyzer(settings, str(b), Metrics()))
    assert analyzer is None and reason and "\n" not in reason
    assert "expected [N, 3, 256, 256]" in reason
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1 and reason in logged[0] and "\n" not in logged[0]
