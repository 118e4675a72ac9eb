"""What an encoder graph really takes and gives, read from the ONNX Runtime
session at load, so a bundle works whatever its export: tensor names (taken
from the graph when the manifest leaves them empty, or names one the graph
does not have and the graph leaves no doubt), a fixed batch (run in chunks of
that size), int32 or int64 token ids, with or without an attention mask.
Anything else (an image input that is not Nx3xHxW at the bundle's size, an
output that is not N x embedding_dim) is refused here with one line, never
met as a traceback mid-stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import ModelError
from .bundle import EncoderSpec, TextEncoderSpec

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(double)")
_INTS = ("tensor(int64)", "tensor(int32)")


@dataclass(frozen=True)
class GraphIO:
    """How to feed one encoder: its input names and dtypes, its output, and
    the batch it was exported with (None = any)."""
    inputs: tuple[tuple[str, Any], ...]  # (name, numpy dtype), in feed order
    output: str
    batch: int | None

    def run(self, session: ort.InferenceSession, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """One output row per input row; a fixed-batch graph runs in chunks,
        the last padded with copies of its final row."""
        feeds = [a.astype(dt, copy=False) for a, (_, dt) in zip(arrays, self.inputs)]
        n = len(feeds[0])
        if self.batch is None or self.batch == n:
            return self._once(session, feeds)
        b = self.batch
        out = []
        for start in range(0, n, b):
            chunk = [f[start:start + b] for f in feeds]
            short = b - len(chunk[0])
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            out.append(self._once(session, chunk)[:b - short])
        return np.concatenate(out)

    def _once(self, session: ort.InferenceSession, feeds: list[np.ndarray]) -> np.ndarray:
        return session.run([self.output], {name: f for (name, _), f in zip(self.inputs, feeds)})[0]


def _dims(arg: Any) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in (arg.shape or [])]


def _pick(wanted: str, args: list[Any], role: str, what: str,
          fits: Callable[[Any], bool] = lambda a: True) -> Any:
    """The graph tensor for `role`: the manifest's name when the graph has it,
    else the only candidate that fits."""
    by_name = {a.name: a for a in args}
    if wanted and wanted in by_name:
        return by_name[wanted]
    fitting = [a for a in args if fits(a)]
    names = ", ".join(a.name for a in args) or "none"
    if len(fitting) != 1:
        said = f"the manifest names {wanted!r}, which it does not have, and " if wanted else ""
        raise ModelError(f"{what}: {said}cannot tell which {role} to use (graph has: {names}); "
                         f"set it in manifest.json")
    if wanted:
        log.warning("%s: manifest names %s %r, the graph has none; using %r", what, role, wanted, fitting[0].name)
    return fitting[0]


def _batch_of(args: list[Any], what: str) -> int | None:
    batches = {_dims(a)[0] for a in args if _dims(a)}
    fixed = {b for b in batches if b is not None}
    if len(fixed) > 1:
        raise ModelError(f"{what}: inputs disagree on their batch size ({sorted(fixed)})")
    batch = fixed.pop() if fixed else None
    if batch is not None:
        log.info("%s was exported with a fixed batch of %d; it runs in chunks of %d", what, batch, batch)
    return batch


def _output(session: ort.InferenceSession, spec: EncoderSpec, embedding_dim: int, what: str) -> str:
    def fits(a: Any) -> bool:
        d = _dims(a)
        return a.type in _FLOATS and len(d) == 2 and d[1] in (None, embedding_dim)
    outputs = session.get_outputs()
    out = _pick(spec.output, outputs, "output", what, fits if len(outputs) > 1 else lambda a: True)
    d = _dims(out)
    if out.type not in _FLOATS:
        raise ModelError(f"{what}: output {out.name!r} is {out.type}, expected float embeddings")
    if out.shape is not None and len(d) != 2:
        raise ModelError(f"{what}: output {out.name!r} has shape {out.shape}, expected [N, {embedding_dim}]")
    if len(d) == 2 and d[1] is not None and d[1] != embedding_dim:
        raise ModelError(f"{what}: output {out.name!r} is {d[1]} wide but the manifest's "
                         f"embedding_dim is {embedding_dim}")
    return out.name


def visual_io(session: ort.InferenceSession, spec: EncoderSpec, *, image_size: int,
              embedding_dim: int, what: str = "image encoder") -> GraphIO:
    inputs = session.get_inputs()
    inp = _pick(spec.input, inputs, "image input", what, lambda a: a.type in _FLOATS)
    others = [a.name for a in inputs if a.name != inp.name]
    if others:
        raise ModelError(f"{what}: takes inputs besides the image ({', '.join(others)}); not a CLIP image encoder")
    if inp.type not in _FLOATS:
        raise ModelError(f"{what}: input {inp.name!r} is {inp.type}, expected float pixels")
    d = _dims(inp)
    want = [None, 3, image_size, image_size]
    if len(d) != 4 or any(w is not None and g is not None and g != w for g, w in zip(d, want)):
        raise ModelError(f"{what}: input {inp.name!r} has shape {inp.shape}, expected "
                         f"[N, 3, {image_size}, {image_size}] (manifest image_size {image_size})")
    return GraphIO(inputs=((inp.name, _DTYPES[inp.type]),),
                   output=_output(session, spec, embedding_dim, what), batch=_batch_of([inp], what))


def text_io(session: ort.InferenceSession, spec: TextEncoderSpec, *, context_length: int,
            embedding_dim: int, what: str = "text encoder") -> GraphIO:
    inputs = session.get_inputs()
    ints = [a for a in inputs if a.type in _INTS]
    if len(ints) != len(inputs):
        odd = ", ".join(f"{a.name} ({a.type})" for a in inputs if a.type not in _INTS)
        raise ModelError(f"{what}: takes non-integer inputs ({odd}); expected token ids")
    def mask_like(a: Any) -> bool:
        return "mask" in a.name.lower()
    ids = _pick(spec.input, ints, "token-id input", what, lambda a: not mask_like(a) or len(ints) == 1)
    rest = [a for a in ints if a.name != ids.name]
    mask = None
    if rest:
        mask = _pick(spec.attention_mask, rest, "attention-mask input", what, mask_like)
        extra = [a.name for a in rest if a.name != mask.name]
        if extra:
            raise ModelError(f"{what}: takes inputs it is not known how to fill ({', '.join(extra)})")
    elif spec.attention_mask:
        log.info("%s: the manifest names attention mask %r but the graph takes none; not fed",
                 what, spec.attention_mask)
    feeds = [ids] + ([mask] if mask is not None else [])
    for a in feeds:
        d = _dims(a)
        if len(d) != 2 or (d[1] is not None and d[1] != context_length):
            raise ModelError(f"{what}: input {a.name!r} has shape {a.shape}, expected [N, {context_length}] "
                             f"(manifest tokenizer.context_length {context_length})")
    return GraphIO(inputs=tuple((a.name, _DTYPES[a.type]) for a in feeds),
                   output=_output(session, spec, embedding_dim, what), batch=_batch_of(feeds, what))


def check_probe(out: np.ndarray, n: int, embedding_dim: int, what: str) -> None:
    """A run's output on a probe input: the shapes the graph's metadata left open."""
    if out.shape != (n, embedding_dim):
        raise ModelError(f"{what}: gives shape {list(out.shape)} for {n} input(s), "
                         f"expected [{n}, {embedding_dim}] (manifest embedding_dim)")
    if not np.isfinite(out).all():
        raise ModelError(f"{what}: gives non-finite values on a probe input")
