"""CLIP image and text encoders over ONNX Runtime, with the reference CLIP
pre-processing: RGB, shorter side resized to the model's input size (bicubic,
done in swscale by the sampler), centre crop, scale to [0, 1], normalise with
the bundle's mean/std, NCHW. Embeddings come back L2-normalised."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..config import ModelSettings
from ..errors import ModelError
from .binding import BoundEncoder
from .bundle import Manifest, bundle_fingerprint, read_manifest, verify_bundle
from .graphio import check_probe, text_io, visual_io
from .session import (choose_providers, create_session, fp16_variant, model_cache_dir, session_device,
                      with_batch_profile)

log = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def _first_input(model_path: Path) -> str:
    """A graph's first input name, read without loading its weights' data."""
    import onnx
    return onnx.load(str(model_path), load_external_data=False).graph.input[0].name


class ClipModel:
    """One loaded bundle. `encode_images` is called from the batcher's thread
    only; ONNX Runtime releases the GIL while it runs."""

    def __init__(self, bundle_dir: Path, settings: ModelSettings, cache_dir: Path, *, max_batch: int = 32) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        m = self.manifest
        self.cache_dir = Path(cache_dir)
        digests = verify_bundle(self.bundle_dir, m, self.cache_dir)
        providers = choose_providers(settings.providers, fp16=settings.fp16, cache_dir=self.cache_dir)
        self.provider = providers[0][0]
        visual_path = self.bundle_dir / m.visual.file
        visual_providers = providers
        if self.provider == "TensorrtExecutionProvider":
            # Engines per model file, and one profile for every batch size up to max_batch.
            visual_providers = choose_providers(settings.providers, fp16=settings.fp16,
                                                cache_dir=model_cache_dir(self.cache_dir, visual_path))
            visual_providers = with_batch_profile(visual_providers, m.visual.input or _first_input(visual_path),
                                                  m.image_size, max_batch)
        if self.provider == "CUDAExecutionProvider" and settings.fp16:
            visual_path = fp16_variant(visual_path, self.cache_dir) or visual_path
        cpu = dict(cpu_threads=settings.cpu_threads, spin=settings.cpu_spin,
                   cache_dir=self.cache_dir if settings.save_optimized else None)
        self._visual = create_session(visual_path, visual_providers, digest=digests[m.visual.file], **cpu)
        where = f"model bundle {self.bundle_dir}"
        self._visual_what = f"{where}: image encoder {m.visual.file}"
        self._text_what = f"{where}: text encoder {m.text.file}"
        self._text = create_session(self.bundle_dir / m.text.file, providers, digest=digests[m.text.file], **cpu)
        self._visual_io = visual_io(self._visual, m.visual, image_size=m.image_size,
                                    embedding_dim=m.embedding_dim, what=self._visual_what)
        self._text_io = text_io(self._text, m.text, context_length=m.tokenizer.context_length,
                                embedding_dim=m.embedding_dim, what=self._text_what)
        self._bound: BoundEncoder | None = None
        self._tokenizer = self._load_tokenizer()
        self._tok_lock = threading.Lock()
        self.fingerprint = bundle_fingerprint(self.bundle_dir, m, digests)
        # (x/255 - mean)/std == x*scale - offset, per channel, on NCHW
        inv_std = 1.0 / (np.asarray(m.std, np.float32) * 255.0)
        self._scale = inv_std.reshape(1, 3, 1, 1)
        self._offset = (np.asarray(m.mean, np.float32) * 255.0 * inv_std).reshape(1, 3, 1, 1)
        self._probe()
        log.info("model %s loaded on %s", m.name, self.active_providers[0])

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.manifest.tokens_per_image

    @property
    def logit_scale(self) -> float:
        return self.manifest.logit_scale

    @property
    def active_providers(self) -> list[str]:
        return self._visual.get_providers()

    def _load_tokenizer(self) -> Tokenizer:
        spec = self.manifest.tokenizer
        try:
            tok = Tokenizer.from_file(str(self.bundle_dir / spec.file))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {spec.file}: {exc}") from None
        tok.enable_truncation(max_length=spec.context_length)
        tok.enable_padding(length=spec.context_length, pad_id=spec.pad_id)
        return tok

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """uint8 NHWC RGB crops (already image_size square) -> float32 NCHW normalised.
        Transposing the uint8 data first and normalising in place is ~6x faster
        than converting first (a quarter of the bytes move through the transpose)."""
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2)).astype(np.float32)
        x *= self._scale
        x -= self._offset
        return x

    def _probe(self) -> None:
        """Run each encoder once on a tiny input, so shapes the graph's
        metadata leaves open (a dynamic output width) and kernels that fail
        only when run are one clear error at load, not mid-stream."""
        m = self.manifest
        for what, run, n in (
                (self._visual_what,
                 lambda: self._visual_io.run(self._visual, [self.preprocess(
                     np.zeros((1, m.image_size, m.image_size, 3), np.uint8))]), 1),
                (self._text_what, lambda: self._run_text(*self.tokenize(["a photo"])), 1)):
            try:
                out = run()
            except Exception as exc:  # onnxruntime's own errors: the first line says what
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"{what} fails on a probe input: {first}") from None
            check_probe(np.asarray(out), n, m.embedding_dim, what)

    def use_io_binding(self) -> None:
        """Run the image encoder through IO binding on its session's device
        (graphs that take any batch; a fixed-batch graph runs in chunks)."""
        if self._visual_io.batch is None:
            self._bound = BoundEncoder(self._visual, self._visual_io.inputs[0][0], self._visual_io.output,
                                       session_device(self.active_providers))

    def encode_prepared(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of `preprocess` output."""
        out = self._bound.run(x) if self._bound is not None else self._visual_io.run(self._visual, [x])
        return l2_normalize(out.astype(np.float32, copy=False))

    def encode_images(self, crops: np.ndarray) -> np.ndarray:
        return self.encode_prepared(self.preprocess(crops))

    def _run_text(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._text_io.run(self._text, [ids, mask][:len(self._text_io.inputs)])

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self._tok_lock:  # the tokenizer's padding state is not thread-safe to share
            encs = self._tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Normalised text embeddings, and the number of real (non-pad) tokens encoded."""
        ids, mask = self.tokenize(texts)
        out = self._run_text(ids, mask)
        return l2_normalize(out.astype(np.float32, copy=False)), int(mask.sum())
