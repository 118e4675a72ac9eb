"""ONNX Runtime sessions: provider choice, per-provider options, threads.

Kept apart from any model's pre/post-processing. `auto` prefers TensorRT, then
CUDA, then CPU, and only offers a GPU provider when a GPU and its libraries are
really there, so a CPU-only machine gets no error spam from onnxruntime-gpu.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import ModelError

log = logging.getLogger(__name__)

Provider = tuple[str, dict[str, Any]]


def _can_load(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices via the driver API, 0 when there is no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@functools.cache
def tensorrt_usable() -> bool:
    return _can_load("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")


def choose_providers(choice: str, *, fp16: bool, cache_dir: Path) -> list[Provider]:
    available = set(ort.get_available_providers())
    gpu = cuda_device_count() > 0
    chain: list[Provider] = []
    if choice in ("auto", "tensorrt") and gpu and tensorrt_usable() \
            and "TensorrtExecutionProvider" in available:
        chain.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir / "trt"),
            "trt_timing_cache_enable": True,
        }))
    if choice in ("auto", "tensorrt", "cuda") and gpu and "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"device_id": 0}))
    if choice in ("tensorrt", "cuda") and not chain:
        raise ModelError(f"provider {choice!r} requested but no usable GPU was found")
    chain.append(("CPUExecutionProvider", {}))
    return chain


def create_session(model_path: Path, providers: list[Provider], *, cpu_threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: provider fallback is expected, not noteworthy
    if providers[0][0] == "CPUExecutionProvider":
        opts.intra_op_num_threads = cpu_threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=opts,
            providers=[name for name, _ in providers],
            provider_options=[o for _, o in providers],
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"cannot load ONNX model {model_path}: {exc}") from None


def fp16_variant(model_path: Path, cache_dir: Path) -> Path | None:
    """An fp16 copy of a model (inputs/outputs stay fp32) for the CUDA provider.
    None when the converter is unavailable; the fp32 model is used then."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        return None
    target = cache_dir / f"{model_path.stem}.fp16.onnx"
    if not target.exists() or target.stat().st_mtime < model_path.stat().st_mtime:
        cache_dir.mkdir(parents=True, exist_ok=True)
        model = float16.convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
        tmp = target.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(target)
    return target
