"""`streamguard models quantize`: int8 bundles keep the planted behaviour,
report the fp32/int8 embedding cosine, and are refused below --min-cosine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from streamguard.analysis.categories import CATEGORY_NAMES
from streamguard.analysis.scoring import ModerationScorer
from streamguard.config import ModelSettings
from streamguard.inference.bundle import read_manifest
from streamguard.inference.clip import ClipModel
from streamguard.inference.quantize import natural_images, quantize_bundle

from streamguard.inference.export import make_shape_real_bundle
from test_model_scoring import frames_with_red_fraction


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("vit") / "b"
    make_shape_real_bundle(dest, "tiny")
    return dest


def test_quantized_test_bundle_scores_the_planted_behaviour_the_same(cli, test_bundle, tmp_path):
    res = cli("models", "quantize", test_bundle, "--dest", tmp_path / "q")
    assert res.returncode == 0, res.stderr
    assert "mean 1.0000" in res.stdout or "mean 0.99" in res.stdout
    report = read_manifest(tmp_path / "q").quantization
    assert report is not None and report.mean_cosine >= 0.99 and report.images == 32
    shown = json.loads(cli("models", "inspect", tmp_path / "q").stdout)["quantization"]
    assert shown["mean_cosine"] == report.mean_cosine
    model = ClipModel(tmp_path / "q", ModelSettings(providers="cpu"), tmp_path / "c")
    scores = ModerationScorer(model, tmp_path / "s").score(
        model.encode_images(frames_with_red_fraction([1.0, 0.7, 0.55, 0.45, 0.2, 0.0])))
    v = CATEGORY_NAMES.index("violence")
    others = [i for i in range(len(CATEGORY_NAMES)) if i != v]
    for row in scores[:3]:
        assert row[v] >= 0.9 and (row[others] < 0.1).all()
    assert (scores[3:] < 0.1).all()


def test_vit_is_really_quantized_and_close_to_fp32(small_vit, tmp_path):
    report = quantize_bundle(small_vit, tmp_path / "q")
    assert 0.99 <= report.mean_cosine < 1.0 and report.min_cosine <= report.mean_cosine
    assert report.quantized == ["visual.onnx"] and "per-tensor" in report.method
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "visual.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
    assert (tmp_path / "q" / "visual.onnx").stat().st_size < (small_vit / "visual.onnx").stat().st_size
    stored = read_manifest(tmp_path / "q")
    assert stored.quantization == report and stored.name.endswith("-int8")
    # the text encoder is untouched: prompt embeddings stay the fp32 ones
    assert (tmp_path / "q" / "textual.onnx").read_bytes() == (small_vit / "textual.onnx").read_bytes()


def test_below_min_cosine_is_refused_and_nothing_written(cli, small_vit, tmp_path):
    res = cli("models", "quantize", small_vit, "--dest", tmp_path / "q", "--min-cosine", "1")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "below --min-cosine 1" in lines[0] and "per-channel" in lines[0], res.stderr
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))


def test_image_set_is_fixed_and_natural_like():
    a, b = natural_images(4, 64, seed=0), natural_images(4, 64, seed=0)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, natural_images(4, 64, seed=1))
    # neither flat nor white noise: neighbouring pixels correlate strongly
    x = a.astype(np.float32)
    corr = np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1]
    assert x.std() > 20 and corr > 0.8
