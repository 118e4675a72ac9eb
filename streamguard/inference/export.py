"""`streamguard models export`: turn CLIP weights into a model bundle.

Sources:
  - a Hugging Face CLIP directory (`CLIPModel.save_pretrained` output: config.json,
    weights, tokenizer files, preprocessor_config.json);
  - `--random-init ARCH`: a known architecture with random weights (a *shape-real*
    bundle: the real cost of a model, none of its knowledge; marked in its
    manifest, and `serve`/`scan` warn when they load one).

Each encoder is exported on its own (`visual.onnx`: pixel_values -> projected
image embedding; `textual.onnx`: input_ids -> projected text embedding), both
with a dynamic batch axis. The text graph takes no attention mask: CLIP's text
transformer is causal and pools at the end-of-text token, so padding after it
cannot change the result.

The export is verified before it counts: the bundle is loaded with the
project's own `ClipModel` (manifest, tokenizer, preprocessing), and its
embeddings of a few images and texts are compared with the framework's on the
very same inputs. A bundle that disagrees beyond tolerance loses its manifest
(so it never looks like a bundle) and the command fails with one line.

PyTorch and transformers are the optional extra `streamguard[export]`; nothing
outside this module imports them, and this module only imports them inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from .bundle import (CLIP_MEAN, CLIP_STD, MANIFEST_NAME, EncoderSpec, FileEntry, Manifest, TextEncoderSpec,
                     TokenizerSpec, read_manifest, sha256_file, write_manifest)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'streamguard[export]'"
OPSET = 17
VISUAL_FILE, TEXT_FILE, TOKENIZER_FILE = "visual.onnx", "textual.onnx", "tokenizer.json"
# Verification: L2-normalised embeddings of ONNX Runtime vs the framework.
MIN_COSINE = 0.999
MAX_ABS_DIFF = 1e-3
VERIFY_TEXTS = ("a photo of a dog", "two people fighting in the street",
                "a slide with a bar chart", "an empty parking lot at night")
VERIFY_IMAGES = 4

# Architectures for --random-init, in transformers' CLIPConfig terms.
# vit-b-32: OpenAI CLIP ViT-B/32 (151 M parameters). tiny: the same shape
# family at toy size, for tests.
ARCHS: dict[str, dict[str, Any]] = {
    "vit-b-32": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=32, image_size=224),
        "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77, vocab_size=49408),
        "projection_dim": 512,
    },
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       patch_size=32, image_size=224),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77, vocab_size=2048),
        "projection_dim": 16,
    },
}


def _require_framework() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ModelError(f"`models export` needs PyTorch and transformers ({exc.name or 'torch'} is not "
                         f"installed): {INSTALL_HINT}") from None
    # Our own lines say what happened; progress bars and advice would break the one-line error.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return torch, transformers


@dataclass
class Verification:
    image_max_abs: float
    image_min_cos: float
    text_max_abs: float
    text_min_cos: float

    @property
    def ok(self) -> bool:
        return (min(self.image_min_cos, self.text_min_cos) >= MIN_COSINE
                and max(self.image_max_abs, self.text_max_abs) <= MAX_ABS_DIFF)

    def summary(self) -> str:
        return (f"images: max abs diff {self.image_max_abs:.2e}, min cosine {self.image_min_cos:.6f}; "
                f"texts: max abs diff {self.text_max_abs:.2e}, min cosine {self.text_min_cos:.6f} "
                f"(tolerance: abs <= {MAX_ABS_DIFF:g}, cosine >= {MIN_COSINE})")


# ------------------------------------------------------------ torch side


def _encoders(torch: Any, clip: Any) -> tuple[Any, Any]:
    """The two halves of a CLIPModel as modules returning projected embeddings.
    Built from the submodules rather than get_*_features, whose return type
    changed across transformers releases."""

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model, self.projection = clip.vision_model, clip.visual_projection

        def forward(self, pixel_values):
            return self.projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model, self.projection = clip.text_model, clip.text_projection

        def forward(self, input_ids):
            return self.projection(self.text_model(input_ids=input_ids).pooler_output)

    return Visual().eval(), Text().eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tracing warns about every Python-level shape check in transformers'
    code (constant under a fixed context length and image size); the
    verification that follows is what tells whether the graph is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_onnx(torch: Any, module: Any, example: Any, path: Path, in_name: str, out_name: str) -> None:
    # The TorchScript exporter: it needs no extra package (the dynamo one
    # wants onnxscript) and handles CLIP's graphs at opset 17.
    try:
        with torch.no_grad(), _quiet():
            torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                              dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter's own errors: its first line says what
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"ONNX export of {path.name} failed: {first}") from None


# ------------------------------------------------------------ sources


def _hf_preprocessing(src: Path, image_size: int) -> tuple[tuple, tuple]:
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if crop not in (None, image_size):
        raise ModelError(f"{path}: crop size {crop} differs from the vision model's image size {image_size}")
    return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def _hf_tokenizer(src: Path, dest: Path, text_config: Any) -> TokenizerSpec:
    from transformers import AutoTokenizer

    # Without its files, transformers would build an empty tokenizer from the
    # model type, and export would "succeed" with a text side that knows no word.
    if not ((src / TOKENIZER_FILE).is_file() or (src / "vocab.json").is_file()):
        raise ModelError(f"{src} has no tokenizer ({TOKENIZER_FILE}, or vocab.json + merges.txt)")
    try:
        tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    except Exception as exc:  # transformers raises many kinds for a missing/odd tokenizer
        raise ModelError(f"cannot load the tokenizer in {src}: {exc}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"the tokenizer in {src} has no fast (tokenizer.json) form")
    size = backend.get_vocab_size()
    if size > text_config.vocab_size:
        raise ModelError(f"the tokenizer in {src} has {size} tokens, the text model only {text_config.vocab_size}")
    # CLIP's text transformer pools at the end-of-text token: the first one
    # with the configured id, or (configs from before transformers 4.31, eos
    # id 2) the highest id in the sequence. A tokenizer whose end-of-text is
    # elsewhere would give silently wrong text embeddings.
    eos = tok.eos_token_id
    expected = size - 1 if text_config.eos_token_id == 2 else text_config.eos_token_id
    if eos != expected:
        raise ModelError(f"the tokenizer in {src} ends texts with id {eos}, but the text model pools at id {expected}")
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dest / TOKENIZER_FILE))
    context = text_config.max_position_embeddings
    max_len = tok.model_max_length if isinstance(tok.model_max_length, int) and tok.model_max_length < 10**6 \
        else context
    return TokenizerSpec(file=TOKENIZER_FILE, context_length=min(context, max_len),
                         pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)


def _random_tokenizer(dest: Path, vocab_size: int) -> tuple[TokenizerSpec, int]:
    """The test bundle's word-level tokenizer (the project's prompts' words):
    tokenizing costs nothing next to the encoders, and the text encoder's cost
    is set by the context length, which is CLIP's. Returns the spec and the
    end-of-text id (where CLIP's text transformer pools)."""
    from .testmodel import SPECIALS, _build_tokenizer, _groups, _words

    words = sorted({w for _, prompts in _groups() for p in prompts for w in _words(p)}
                   | {w for t in VERIFY_TEXTS for w in _words(t)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab[word] = len(vocab)
    if len(vocab) > vocab_size:
        raise ModelError(f"architecture vocabulary ({vocab_size}) is smaller than the tokenizer's ({len(vocab)})")
    _build_tokenizer(vocab, dest / TOKENIZER_FILE)
    return TokenizerSpec(file=TOKENIZER_FILE, context_length=77, pad_id=vocab["<pad>"]), vocab["<|endoftext|>"]


# ------------------------------------------------------------ bundle


def _finish(clip: Any, torch: Any, dest: Path, *, name: str, description: str, mean: tuple, std: tuple,
            tokenizer: TokenizerSpec, shape_real: bool) -> tuple[Manifest, Verification]:
    vcfg = clip.config.vision_config
    visual, text = _encoders(torch, clip)
    size = vcfg.image_size
    _export_onnx(torch, visual, torch.zeros(2, 3, size, size), dest / VISUAL_FILE, "pixel_values", "image_embeds")
    ids = torch.zeros(2, tokenizer.context_length, dtype=torch.int64)
    _export_onnx(torch, text, ids, dest / TEXT_FILE, "input_ids", "text_embeds")
    manifest = Manifest(
        name=name, description=description, image_size=size, mean=mean, std=std,
        embedding_dim=clip.config.projection_dim,
        tokens_per_image=(size // vcfg.patch_size) ** 2 + 1,
        logit_scale=float(math.exp(float(clip.logit_scale.detach()))),
        visual=EncoderSpec(file=VISUAL_FILE, input="pixel_values", output="image_embeds"),
        text=TextEncoderSpec(file=TEXT_FILE, input="input_ids", output="text_embeds", input_dtype="int64"),
        tokenizer=tokenizer, shape_real=shape_real,
    )
    for file in (VISUAL_FILE, TEXT_FILE, TOKENIZER_FILE):
        path = dest / file
        manifest.files[file] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    write_manifest(dest, manifest)
    result = verify_bundle(dest, visual, text, torch)
    if not result.ok:
        (dest / MANIFEST_NAME).unlink()
        raise ModelError(f"export of {name} does not match the framework: {result.summary()}")
    return manifest, result


def verify_bundle(dest: Path, visual: Any, text: Any, torch: Any) -> Verification:
    """The bundle through the project's loader vs the torch modules, same inputs."""
    from ..config import ModelSettings
    from .clip import ClipModel, l2_normalize

    clip_log = logging.getLogger(ClipModel.__module__)
    level = clip_log.level
    clip_log.setLevel(logging.ERROR)  # the shape-real warning is for serve/scan, not for the exporter
    try:
        with tempfile.TemporaryDirectory(prefix="streamguard-export-") as cache:
            model = ClipModel(dest, ModelSettings(providers="cpu"), Path(cache))
    finally:
        clip_log.setLevel(level)
    rng = np.random.default_rng(0)
    size = model.image_size
    crops = rng.integers(0, 256, (VERIFY_IMAGES, size, size, 3), dtype=np.uint8)
    crops[0] = 0
    crops[1, : size // 2] = (220, 20, 20)  # half saturated red: a structured image besides noise
    onnx_img = model.encode_images(crops)
    onnx_txt, _ = model.encode_texts(list(VERIFY_TEXTS))
    ids, _ = model.tokenize(list(VERIFY_TEXTS))
    with torch.no_grad():
        ref_img = l2_normalize(visual(torch.from_numpy(model.preprocess(crops))).numpy())
        ref_txt = l2_normalize(text(torch.from_numpy(ids)).numpy())

    def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        return float(np.abs(a - b).max()), float((a * b).sum(axis=1).min())

    return Verification(*compare(onnx_img, ref_img), *compare(onnx_txt, ref_txt))


def _prepare_dest(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ModelError(f"{dest} is not empty: give a new or empty --dest")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def export_hf(src: Path, dest: Path) -> tuple[Manifest, Verification]:
    """A Hugging Face CLIP directory -> bundle at dest (verified)."""
    torch, transformers = _require_framework()
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        clip = transformers.CLIPModel.from_pretrained(str(src), torch_dtype=torch.float32).eval()
    except Exception as exc:  # a wrong or damaged checkpoint: one line, not a traceback
        raise ModelError(f"cannot load {src} as a CLIP model: {exc}") from None
    mean, std = _hf_preprocessing(src, clip.config.vision_config.image_size)
    dest = _prepare_dest(dest)
    tokenizer = _hf_tokenizer(src, dest, clip.config.text_config)
    name = getattr(clip.config, "_name_or_path", "") or src.name
    return _finish(clip, torch, dest, name=Path(name).name or src.name, mean=mean, std=std,
                   description=f"exported from {src.resolve()} by streamguard models export",
                   tokenizer=tokenizer, shape_real=False)


def random_clip(arch: str, *, seed: int = 0, eos_id: int = 3) -> Any:
    torch, transformers = _require_framework()
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    config = transformers.CLIPConfig(
        text_config={**spec["text"], "eos_token_id": eos_id, "bos_token_id": eos_id - 1, "pad_token_id": 0},
        vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval()


def export_random(arch: str, dest: Path, *, seed: int = 0) -> tuple[Manifest, Verification]:
    """A shape-real bundle: the real architecture, random weights."""
    torch, _ = _require_framework()
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    dest = _prepare_dest(dest)
    tokenizer, eos_id = _random_tokenizer(dest, ARCHS[arch]["text"]["vocab_size"])
    clip = random_clip(arch, seed=seed, eos_id=eos_id)
    return _finish(clip, torch, dest, name=f"shape-real-{arch}", mean=CLIP_MEAN, std=CLIP_STD,
                   description=f"{arch} architecture with random weights (seed {seed}): NOT A MODEL, its "
                               "scores mean nothing; only for measuring inference cost",
                   tokenizer=tokenizer, shape_real=True)


def make_shape_real_bundle(dest: Path, arch: str = "vit-b-32", *, seed: int = 0) -> Manifest:
    """For benches: the shape-real bundle at dest, built once and reused while
    its manifest says it is this architecture's."""
    dest = Path(dest)
    if (dest / MANIFEST_NAME).is_file():
        manifest = read_manifest(dest)
        if manifest.shape_real and manifest.name == f"shape-real-{arch}":
            return manifest
        raise ModelError(f"{dest} holds another bundle ({manifest.name}); remove it or pick another dest")
    if dest.exists():  # an export that stopped half-way: no manifest, so not a bundle
        for child in dest.iterdir():
            child.unlink()
    return export_random(arch, dest, seed=seed)[0]
