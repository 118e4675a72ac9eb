"""ONNX Runtime sessions: provider choice, per-provider options, threads.

Kept apart from any model's pre/post-processing. `auto` prefers TensorRT, then
CUDA, then CPU, and only offers a GPU provider when a GPU and its libraries are
really there, so a CPU-only machine gets no error spam from onnxruntime-gpu.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
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


def tensorrt_options(*, fp16: bool, cache_dir: Path) -> dict[str, Any]:
    """TensorRT builds an engine per graph and input shape range, which takes
    minutes for ViT-B/32: the engines and TensorRT's layer timing cache are
    kept on disk under `cache_dir` (per model file, see model_cache_dir), so
    a restart loads them in seconds. fp16 is TensorRT's own mixed precision:
    inputs and outputs stay fp32."""
    return {
        "device_id": 0,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir / "trt"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir / "trt"),
    }


def cuda_options() -> dict[str, Any]:
    """cuDNN picks convolution kernels by trying them once per shape
    (EXHAUSTIVE) and may use as much workspace as it likes: the patch
    embedding of ViT is one large strided convolution."""
    return {
        "device_id": 0,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": True,
    }


def with_batch_profile(providers: list[Provider], input_name: str, image_size: int,
                       max_batch: int) -> list[Provider]:
    """The image encoder's providers with a TensorRT optimisation profile for
    batches 1..max_batch (optimised for max_batch): without one TensorRT
    builds a new engine for every batch size it meets. Other providers are
    returned unchanged."""
    out: list[Provider] = []
    for name, opts in providers:
        if name == "TensorrtExecutionProvider":
            shape = f"3x{image_size}x{image_size}"
            opts = {**opts,
                    "trt_profile_min_shapes": f"{input_name}:1x{shape}",
                    "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{shape}",
                    "trt_profile_max_shapes": f"{input_name}:{max_batch}x{shape}"}
        out.append((name, opts))
    return out


def model_cache_dir(cache_dir: Path, model_path: Path) -> Path:
    """Where derived artefacts of one model file live (its fp16 copy, TensorRT
    engines): named after the file's path, size and modification time, so
    another bundle, or the same file replaced, never picks up a stale one."""
    st = model_path.stat()
    key = hashlib.sha256(f"{model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "ort" / f"{model_path.stem}-{key}"


def session_device(providers: list[str]) -> str:
    """Where a session's inputs live for IO binding: 'cuda' when a GPU
    provider leads, else 'cpu'."""
    return "cuda" if providers and providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider") else "cpu"


def choose_providers(choice: str, *, fp16: bool, cache_dir: Path) -> list[Provider]:
    available = set(ort.get_available_providers())
    gpu = cuda_device_count() > 0
    chain: list[Provider] = []
    if choice in ("auto", "tensorrt") and gpu and tensorrt_usable() \
            and "TensorrtExecutionProvider" in available:
        chain.append(("TensorrtExecutionProvider", tensorrt_options(fp16=fp16, cache_dir=cache_dir)))
    if choice in ("auto", "tensorrt", "cuda") and gpu and "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", cuda_options()))
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
    target = model_cache_dir(cache_dir, model_path) / f"{model_path.stem}.fp16.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        model = float16.convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
        tmp = target.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(target)
    return target
