"""The GPU path's settings, checked on a machine without a GPU: which
providers and options a node with one would get (nothing here runs on a GPU;
CI has none)."""

from __future__ import annotations

import os

from streamguard.inference import session
from streamguard.inference.session import (choose_providers, model_cache_dir, session_device,
                                           with_batch_profile)


def gpu_present(monkeypatch, trt: bool = True) -> None:
    monkeypatch.setattr(session, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(session, "tensorrt_usable", lambda: trt)
    monkeypatch.setattr(session.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


def test_auto_prefers_tensorrt_with_fp16_and_caches_on_disk(monkeypatch, tmp_path):
    gpu_present(monkeypatch)
    chain = choose_providers("auto", fp16=True, cache_dir=tmp_path)
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                          "CPUExecutionProvider"]
    trt = chain[0][1]
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / "trt")
    assert chain[1][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert session_device([name for name, _ in chain]) == "cuda"


def test_cpu_only_machine_gets_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(session, "cuda_device_count", lambda: 0)
    chain = choose_providers("auto", fp16=True, cache_dir=tmp_path)
    assert [name for name, _ in chain] == ["CPUExecutionProvider"]
    assert session_device([name for name, _ in chain]) == "cpu"


def test_batch_profile_only_for_tensorrt(monkeypatch, tmp_path):
    gpu_present(monkeypatch)
    chain = with_batch_profile(choose_providers("auto", fp16=True, cache_dir=tmp_path), "pixel_values", 224, 32)
    trt, cuda = chain[0][1], chain[1][1]
    assert trt["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == trt["trt_profile_max_shapes"] == "pixel_values:32x3x224x224"
    assert not any(k.startswith("trt_") for k in cuda)


def test_model_cache_dir_follows_the_file(tmp_path):
    model = tmp_path / "visual.onnx"
    model.write_bytes(b"one")
    first = model_cache_dir(tmp_path / "cache", model)
    assert model_cache_dir(tmp_path / "cache", model) == first
    other = tmp_path / "b" / "visual.onnx"  # another bundle's file of the same name
    other.parent.mkdir()
    other.write_bytes(b"one")
    assert model_cache_dir(tmp_path / "cache", other) != first
    model.write_bytes(b"two!")  # the file replaced
    os.utime(model, ns=(1, 1))
    assert model_cache_dir(tmp_path / "cache", model) != first
