"""ONNX Runtime sessions: provider choice, per-provider options, threads.

Kept apart from any model's pre/post-processing. `auto` prefers TensorRT, then
CUDA, then CPU, and only offers a GPU provider when a GPU and its libraries are
really there, so a CPU-only machine gets no error spam from onnxruntime-gpu.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
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


def cpu_threads_auto() -> int:
    """Intra-op threads when `model.cpu_threads` is 0.

    Inference and ingest (one decoder thread per stream, plus the event loop)
    share the cores. With few cores the encoder is what limits a node (a
    ViT-B/32 frame costs ~30x its decode), so it gets every core: a thread
    short halves the encoder rate on 2 cores. From 4 cores up, one core is
    left to ingest so decoders are not starved behind the encoder's threads.
    Waiting encoder threads do not spin (unless `model.cpu_spin`), so the
    cores they are given stay usable by decoders between batches."""
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (taskset, cpusets)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores if cores <= 3 else cores - 1


def _hardware_tag() -> str:
    """Level-ALL graphs hold kernels chosen for this CPU (NCHWc layouts, ISA
    extensions): a saved one is only reused on the same kind of machine."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:8]


def optimized_model_path(cache_dir: Path, model_path: Path, digest: str, provider: str) -> Path:
    """Where the optimized graph of a model file (identified by its sha256)
    is kept: per ONNX Runtime version, provider and CPU kind."""
    short = provider.removesuffix("ExecutionProvider").lower()
    return cache_dir / "ort" / f"{model_path.stem}-{digest[:16]}-ort{ort.__version__}-{short}-{_hardware_tag()}.onnx"


def _session_options(providers: list[Provider], cpu_threads: int, spin: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: provider fallback is expected, not noteworthy
    if providers[0][0] == "CPUExecutionProvider":
        opts.intra_op_num_threads = cpu_threads or cpu_threads_auto()
        # One graph runs at a time (the batcher is one thread): no inter-op pool.
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Batches repeat the same few shapes: the arena keeps their buffers and
        # the memory pattern replays the allocation plan of a shape seen before.
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = True
        # Spinning intra-op threads wait for work busy, on cores the decoders
        # need. It is off unless asked for (`model.cpu_spin`): measured on
        # ViT-B/32 int8, 2 threads, the raw session is 10-19% faster with it,
        # but that speed is taken from ingest on a shared machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


def _open(path: Path, opts: ort.SessionOptions, providers: list[Provider]) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=opts, providers=[name for name, _ in providers],
                                provider_options=[o for _, o in providers])


def create_session(model_path: Path, providers: list[Provider], *, cpu_threads: int, spin: bool = False,
                   cache_dir: Path | None = None, digest: str = "") -> ort.InferenceSession:
    """A session for `model_path`. With a cache dir and the file's sha256, the
    CPU graph optimised at level ALL is saved there on first load and loaded
    as-is afterwards, so a restart does not redo the optimisation."""
    opts = _session_options(providers, cpu_threads, spin)
    cached = None
    if cache_dir is not None and digest and providers[0][0] == "CPUExecutionProvider":
        cached = optimized_model_path(cache_dir, model_path, digest, providers[0][0])
        if cached.is_file():
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return _open(cached, opts, providers)
            except Exception as exc:  # a stale or damaged cache entry: rebuild it
                log.warning("discarding cached optimized model %s: %s", cached, exc)
                cached.unlink(missing_ok=True)
                opts = _session_options(providers, cpu_threads, spin)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            opts.optimized_model_filepath = str(tmp)
        except OSError:  # an unwritable cache only costs the optimisation each start
            cached = None
    try:
        session = _open(model_path, opts, providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        if cached is None:
            raise ModelError(f"cannot load ONNX model {model_path}: {_first_line(exc)}") from None
        tmp.unlink(missing_ok=True)  # perhaps only the optimised copy could not be written
        return create_session(model_path, providers, cpu_threads=cpu_threads, spin=spin)
    if cached is not None and tmp.is_file():
        tmp.replace(cached)
        _prune(cached, f"{model_path.stem}-{digest[:16]}-ort")
    return session


def _prune(kept: Path, prefix: str) -> None:
    """Drop optimised copies of the same file left by another ONNX Runtime
    version or CPU kind: each is as large as the model and never read again."""
    for old in kept.parent.glob(f"{glob.escape(prefix)}*.onnx"):
        if old != kept:
            old.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
