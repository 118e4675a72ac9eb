"""Model bundles: a directory with manifest.json, a visual and a text encoder
(ONNX) and a tokenizer.json. The manifest says everything preprocessing and
scoring need, so a bundle exported from any CLIP checkpoint plugs in."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from ..errors import ModelError

MANIFEST_NAME = "manifest.json"

# OpenAI CLIP's normalisation constants (the reference preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderSpec(msgspec.Struct, kw_only=True):
    file: str
    # Tensor names; empty = the session's first input/output.
    input: str = ""
    output: str = ""


class TextEncoderSpec(EncoderSpec, kw_only=True):
    input_dtype: Literal["int64", "int32"] = "int64"
    # Name of an attention-mask input, for exports that take one.
    attention_mask: str = ""


class TokenizerSpec(msgspec.Struct, kw_only=True):
    file: str = "tokenizer.json"
    context_length: Annotated[int, Meta(ge=2)] = 77
    # Token id used to pad to context_length (OpenAI CLIP pads with 0).
    pad_id: int = 0


class FileEntry(msgspec.Struct, kw_only=True):
    sha256: str
    size: int
    # Where `streamguard models pull` fetches it from (relative to the source base URL).
    url: str = ""


class Manifest(msgspec.Struct, kw_only=True):
    format: int = 1
    name: str
    family: Literal["clip"] = "clip"
    description: str = ""
    image_size: Annotated[int, Meta(ge=8, le=4096)] = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    embedding_dim: Annotated[int, Meta(ge=1)]
    # Transformer tokens per image (patches + class token): 50 for ViT-B/32.
    tokens_per_image: Annotated[int, Meta(ge=1)]
    # CLIP's learned temperature (exp(logit_scale) = 100 for OpenAI models).
    logit_scale: Annotated[float, Meta(gt=0)] = 100.0
    visual: EncoderSpec
    text: TextEncoderSpec
    tokenizer: TokenizerSpec = msgspec.field(default_factory=TokenizerSpec)
    files: dict[str, FileEntry] = {}
    # A real architecture with random weights (`models export --random-init`):
    # it costs what the model costs and knows nothing; for measurements only.
    shape_real: bool = False


def read_manifest(bundle_dir: Path) -> Manifest:
    path = bundle_dir / MANIFEST_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        raise ModelError(f"no model bundle at {bundle_dir} (missing {MANIFEST_NAME}); "
                         f"build one with `streamguard models make-test {bundle_dir}` "
                         f"or `streamguard models pull clip-vit-b32`") from None
    except msgspec.DecodeError as exc:
        raise ModelError(f"invalid model manifest {path}: {exc}") from None


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    (bundle_dir / MANIFEST_NAME).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bundle_fingerprint(bundle_dir: Path, manifest: Manifest) -> str:
    """Identifies the text side of a bundle (encoder + tokenizer), for caching
    prompt embeddings. Uses the manifest's checksums when it has them."""
    digest = hashlib.sha256()
    for name in (manifest.text.file, manifest.tokenizer.file):
        entry = manifest.files.get(name)
        digest.update((entry.sha256 if entry else sha256_file(bundle_dir / name)).encode())
    digest.update(str(manifest.tokenizer.context_length).encode())
    return digest.hexdigest()[:16]
