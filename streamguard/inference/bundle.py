"""Model bundles: a directory with manifest.json, a visual and a text encoder
(ONNX) and a tokenizer.json. The manifest says everything preprocessing and
scoring need, so a bundle exported from any CLIP checkpoint plugs in."""

from __future__ import annotations

import hashlib
import json
import os
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


class QuantizeReport(msgspec.Struct, kw_only=True):
    """How a quantized bundle was made and how close it stays to its source:
    the cosine between the fp32 and the quantized image embeddings of a fixed,
    seeded set of generated natural-like images (1 = identical)."""
    method: str
    source: str
    quantized: list[str]
    images: int
    seed: int
    mean_cosine: float
    min_cosine: float
    # Images/s of each image encoder on that set in one batch, on the machine that quantized it.
    fp32_images_per_s: float = 0.0
    int8_images_per_s: float = 0.0


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
    # Set by `streamguard models quantize` on the bundle it writes.
    quantization: QuantizeReport | None = None
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


def bundle_fingerprint(bundle_dir: Path, manifest: Manifest, digests: dict[str, str] | None = None) -> str:
    """Identifies the text side of a bundle (encoder + tokenizer), for caching
    prompt embeddings. Uses `digests` (from verify_bundle), else the
    manifest's checksums, else hashes the files."""
    digest = hashlib.sha256()
    for name in (manifest.text.file, manifest.tokenizer.file):
        entry = manifest.files.get(name)
        known = (digests or {}).get(name) or (entry.sha256 if entry else "")
        digest.update((known or sha256_file(bundle_dir / name)).encode())
    digest.update(str(manifest.tokenizer.context_length).encode())
    return digest.hexdigest()[:16]


VERIFIED_NAME = "verified-files.json"


def _load_verified(cache_dir: Path) -> dict[str, list]:
    try:
        data = json.loads((cache_dir / VERIFIED_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_verified(cache_dir: Path, data: dict[str, list]) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"{VERIFIED_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(cache_dir / VERIFIED_NAME)
    except OSError:  # a read-only cache only costs a re-hash next start
        pass


def verify_bundle(bundle_dir: Path, manifest: Manifest, cache_dir: Path) -> dict[str, str]:
    """sha256 of each file the model needs, checked against the manifest's
    `files` (size, then checksum) so a truncated or swapped file is one clear
    error at start. A file is hashed once: the result is kept in the cache
    keyed by path, size and mtime, so later starts cost a stat per file."""
    verified = _load_verified(cache_dir)
    digests: dict[str, str] = {}
    changed = False
    for name in dict.fromkeys((manifest.visual.file, manifest.text.file, manifest.tokenizer.file)):
        path = (bundle_dir / name).resolve()
        try:
            st = path.stat()
        except OSError:
            raise ModelError(f"model bundle {bundle_dir} is missing {name}") from None
        entry = manifest.files.get(name)
        if entry and entry.size and st.st_size != entry.size:
            raise ModelError(f"model bundle {bundle_dir}: {name} is {st.st_size} bytes, the manifest says "
                             f"{entry.size} (truncated or replaced; pull or export it again)")
        key, stamp = str(path), [st.st_size, st.st_mtime_ns]
        cached = verified.get(key)
        if cached and cached[:2] == stamp:
            digest = cached[2]
        else:
            digest = sha256_file(path)
            verified[key] = [*stamp, digest]
            changed = True
        if entry and entry.sha256 and digest != entry.sha256:
            raise ModelError(f"model bundle {bundle_dir}: checksum mismatch for {name} (sha256 {digest[:12]}…, "
                             f"manifest says {entry.sha256[:12]}…); pull or export it again")
        digests[name] = digest
    if changed:
        _store_verified(cache_dir, verified)
    return digests
