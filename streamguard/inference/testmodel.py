"""The deterministic test bundle: a CLIP-shaped pair of ONNX encoders with a
planted behaviour, so the whole pipeline can be tested without real weights.

Planted behaviours (CONTRACT §1), through the project's own prompts and
scoring: a frame that is mostly saturated red (R >= 200, G and B <= 40) embeds
next to the `violence` prompts; one that is mostly saturated green (G >= 200,
R and B <= 40) next to the `Sports` prompts and tags (and the safe scenes, so
it moderates clean); any other frame next to the safe prompts, leaning a
little towards `Film & TV` so that its categorization is a spread-out
distribution with no `Sports` to speak of. An image or crop that is mostly
saturated blue (B >= 200, R and G <= 40) embeds along an axis of its own (the
logo gallery's planted behaviour): next to every other mostly-blue image, far
from everything else. It is a test device for the pipeline, not a model.

How: the text encoder sums per-token vectors. Each word that occurs in the
prompts (or, for a content category, the tags) of exactly one group (a
moderation category, the safe set, a content category) points along that
group's axis; every word also carries a fixed random component in the
dimensions no group uses, so phrasings of one concept differ: an ensemble's
mean is not unit length, and by a different amount per concept, as with a
real CLIP (the bias tests/test_model_scoring.py catches needs this). The
visual encoder measures the fractions of saturated-red and saturated-green
pixels and blends three fixed embeddings with steep sigmoids around 50%.

Blue is graded, not a step: its weight is a sigmoid of slope BLUE_SLOPE in the
blue fraction, so a crop that is half blue sits half way and one that is 30 %
blue leans a little towards blue. "Mostly blue" still decides (a crop under
45 % blue is on the far side of every background), but a region that holds
part of a blue logo is closer to it than one that holds none, as a crop with
part of a logo is with a real CLIP: that is what lets the logo detector's
coarse pass find where to look (analysis/logos.py). The blue axis is a
dimension no word of the text encoder uses, so a blue frame moderates and
categorizes like any other frame (its text similarities are the "other"
frame's, scaled down).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..analysis.categories import MODERATION_CATEGORIES, SAFE_PROMPTS
from ..analysis.tags import TAG_TEMPLATE, TAGS_BY_CATEGORY
from ..analysis.taxonomy import TOPICS
from .bundle import EncoderSpec, FileEntry, Manifest, TextEncoderSpec, TokenizerSpec, sha256_file, write_manifest

EMBED_DIM = 256
WORD_NOISE = 0.6  # norm of each word's component off the group axes
IMAGE_SIZE = 224
CONTEXT = 77
SUBSAMPLE = 4
BLUE_SLOPE = 12.0  # blue weight = sigmoid(BLUE_SLOPE * (blue fraction - 0.5))
BLUE_DIM = EMBED_DIM - 1  # the blue axis: no group's, and zero in every word vector
SPECIALS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")
_WORD = re.compile(r"\w+|[^\w\s]")


def _groups() -> list[tuple[str, tuple[str, ...]]]:
    """(group, its prompts) for every group with an axis; a content category's
    prompts come first, then its tags as encoded (TAG_TEMPLATE)."""
    groups = [(c.name, c.prompts) for c in MODERATION_CATEGORIES]
    groups.append(("__safe__", SAFE_PROMPTS))
    groups += [(t.name, t.prompts + tuple(TAG_TEMPLATE.format(tag) for tag in TAGS_BY_CATEGORY[t.name]))
               for t in TOPICS]
    return groups


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _build_tokenizer(vocab: dict[str, int], path: Path) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    tok.save(str(path))


def _text_model(table: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["token_embedding", "input_ids"], ["tok"], axis=0),
        helper.make_node("ReduceSum", ["tok", "axis1"], ["text_embeds"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "streamguard_test_text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", CONTEXT])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "token_embedding"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamguard",
                              ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _busy_work(layers: int) -> tuple[list, list]:
    """Nodes that cost real compute (~0.3 GFLOP per frame per layer) and change
    nothing: for load tests that need inference to fall behind for real."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((1024, 1024)) / 32).astype(np.float32), "busy_w"),
             numpy_helper.from_array(np.array([-1, 1024], np.int64), "busy_shape"),
             numpy_helper.from_array(np.array(0.0, np.float32), "busy_zero")]
    nodes = [helper.make_node("Reshape", ["pixel_values", "busy_shape"], ["busy_0"])]
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [f"busy_{i}", "busy_w"], [f"busy_mm{i}"]),
                  helper.make_node("Tanh", [f"busy_mm{i}"], [f"busy_{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"busy_{layers}"], ["busy_sum"], keepdims=0),
              helper.make_node("Mul", ["busy_sum", "busy_zero"], ["busy_nothing"])]
    return nodes, inits


def _majority(n, mask: str, slope: str, out: str, frac: str | None = None) -> list:
    """Nodes for `out` = sigmoid(slope * (`frac` - 0.5)), `frac` being the
    mean of the per-pixel `mask` per image (named, for tests that read it)."""
    frac = frac or f"{out}_frac"
    return [n("ReduceMean", [mask], [f"{frac}4"], axes=[1, 2, 3], keepdims=1),
            n("Reshape", [f"{frac}4", "shape_n1"], [frac]),
            n("Sub", [frac, "half"], [f"{out}_d"]), n("Mul", [f"{out}_d", slope], [f"{out}_s"]),
            n("Sigmoid", [f"{out}_s"], [out])]


def _visual_model(red: np.ndarray, green: np.ndarray, blue: np.ndarray, other: np.ndarray, mean: tuple,
                  std: tuple, path: Path, busy_layers: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    sharp = 300.0  # per-pixel threshold steepness (in 0..1 units)
    inits = [
        const("std", np.asarray(std).reshape(1, 3, 1, 1)),
        const("mean", np.asarray(mean).reshape(1, 3, 1, 1)),
        const("r_lo", 200 / 255), const("gb_hi", 40 / 255), const("sharp", sharp),
        const("half", 0.5), const("majority_sharp", 200.0), const("one", 1.0),
        const("red_embed", red.reshape(1, -1)), const("green_embed", green.reshape(1, -1)),
        const("other_embed", other.reshape(1, -1)), const("blue_embed", blue.reshape(1, -1)),
        const("blue_slope", BLUE_SLOPE), const("zero", 0.0),
        numpy_helper.from_array(np.array([0, 0], np.int64), "sub_starts"),
        numpy_helper.from_array(np.array([IMAGE_SIZE, IMAGE_SIZE], np.int64), "sub_ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "sub_axes"),
        numpy_helper.from_array(np.array([SUBSAMPLE, SUBSAMPLE], np.int64), "sub_steps"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "shape_n1"),
    ]
    n = helper.make_node
    nodes = [
        # Every SUBSAMPLE-th pixel is plenty to judge a majority, and keeps
        # the test model's cost far below decoding in benchmarks.
        n("Slice", ["pixel_values", "sub_starts", "sub_ends", "sub_axes", "sub_steps"], ["px"]),
        n("Mul", ["px", "std"], ["xs"]),
        n("Add", ["xs", "mean"], ["rgb"]),  # back to 0..1 RGB
        n("Split", ["rgb"], ["R", "G", "B"], axis=1),
        # saturated red: R high, G and B low
        n("Sub", ["R", "r_lo"], ["r_d"]), n("Mul", ["r_d", "sharp"], ["r_s"]), n("Sigmoid", ["r_s"], ["pr"]),
        n("Sub", ["gb_hi", "G"], ["g_d"]), n("Mul", ["g_d", "sharp"], ["g_s"]), n("Sigmoid", ["g_s"], ["pg"]),
        n("Sub", ["gb_hi", "B"], ["b_d"]), n("Mul", ["b_d", "sharp"], ["b_s"]), n("Sigmoid", ["b_s"], ["pb"]),
        n("Mul", ["pr", "pg"], ["prg"]), n("Mul", ["prg", "pb"], ["p"]),
        *_majority(n, "p", "majority_sharp", "m", frac="frac"),
        # saturated green: G high, R and B low (R and B low are pg's and pb's twins)
        n("Sub", ["G", "r_lo"], ["G_d"]), n("Mul", ["G_d", "sharp"], ["G_s"]), n("Sigmoid", ["G_s"], ["qg"]),
        n("Sub", ["gb_hi", "R"], ["R_d"]), n("Mul", ["R_d", "sharp"], ["R_s"]), n("Sigmoid", ["R_s"], ["qr"]),
        n("Mul", ["qg", "qr"], ["qgr"]), n("Mul", ["qgr", "pb"], ["q"]),
        *_majority(n, "q", "majority_sharp", "mg"),
        # saturated blue: B high, R and G low (graded: see the module doc)
        n("Sub", ["B", "r_lo"], ["B_d"]), n("Mul", ["B_d", "sharp"], ["B_s"]), n("Sigmoid", ["B_s"], ["qb"]),
        n("Mul", ["qb", "qr"], ["qbr"]), n("Mul", ["qbr", "pg"], ["qbrg"]),
        *_majority(n, "qbrg", "blue_slope", "mb"),
        n("Sub", ["one", "m"], ["not_m0"]), n("Sub", ["not_m0", "mg"], ["not_m1"]),
        n("Sub", ["not_m1", "mb"], ["not_m2"]), n("Max", ["not_m2", "zero"], ["not_m"]),
        n("Mul", ["m", "red_embed"], ["e_red"]), n("Mul", ["mg", "green_embed"], ["e_green"]),
        n("Mul", ["mb", "blue_embed"], ["e_blue"]), n("Mul", ["not_m", "other_embed"], ["e_other"]),
        n("Add", ["e_red", "e_green"], ["e_rg"]), n("Add", ["e_rg", "e_blue"], ["e_rgb"]),
        n("Add", ["e_rgb", "e_other"], ["image_embeds" if not busy_layers else "embeds"]),
    ]
    if busy_layers:
        busy_nodes, busy_inits = _busy_work(busy_layers)
        nodes += busy_nodes + [n("Add", ["embeds", "busy_nothing"], ["image_embeds"])]
        inits += busy_inits
    graph = helper.make_graph(
        nodes, "streamguard_test_visual",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamguard", ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_test_bundle(out_dir: Path, *, busy_layers: int = 0) -> Manifest:
    """Write the test bundle to out_dir (created if needed) and return its manifest.
    `busy_layers` > 0 makes the image encoder deliberately expensive (load tests)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _groups()
    axis = {name: i for i, (name, _) in enumerate(groups)}

    owners: dict[str, set[str]] = {}
    for name, prompts in groups:
        for prompt in prompts:
            for word in _words(prompt):
                owners.setdefault(word, set()).add(name)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in sorted(owners):
        vocab[word] = len(vocab)

    table = np.zeros((len(vocab), EMBED_DIM), np.float32)
    rng = np.random.default_rng(11)
    spare = EMBED_DIM - len(groups)  # the dimensions no group's axis uses
    assert BLUE_DIM >= len(groups)
    for word in sorted(owners):
        noise = rng.standard_normal(spare).astype(np.float32)
        noise[BLUE_DIM - len(groups)] = 0.0  # the blue axis is no word's
        table[vocab[word], len(groups):] = WORD_NOISE * noise / np.linalg.norm(noise)
        if len(owners[word]) == 1:
            table[vocab[word], axis[next(iter(owners[word]))]] = 1.0
    # Every prompt must carry its group's signal (a tag need not: it then
    # matches nothing in particular).
    tag_prompts = {TAG_TEMPLATE.format(tag) for tags in TAGS_BY_CATEGORY.values() for tag in tags}
    for name, prompts in groups:
        for prompt in prompts:
            if prompt not in tag_prompts and not any(len(owners[w]) == 1 for w in _words(prompt)):
                raise ValueError(f"test model: prompt {prompt!r} of {name} has no word unique to its group")

    def unit(name: str) -> np.ndarray:
        v = np.zeros(EMBED_DIM, np.float32)
        v[axis[name]] = 1.0
        return v

    safe = unit("__safe__")
    # Any other frame: the safe scenes, with a lean towards one content
    # category, so its categorization is spread out and deterministic.
    other = safe + 0.02 * unit("Film & TV")
    # A red frame leans towards the safe axis a little, so it scores ~0 for
    # every category but violence (instead of 1/(1+#safe) for unrelated ones).
    red_embed = unit("violence") + 0.3 * other
    green_embed = unit("Sports") + 0.3 * safe
    # A blue image leans on "other" like a red one, so it moderates and
    # categorizes as an ordinary frame, yet sits 0.29 cosine from it.
    blue_embed = 0.3 * other
    blue_embed[BLUE_DIM] = 1.0

    manifest = Manifest(
        name="streamguard-test", description="deterministic CLIP-shaped test bundle (not a model)",
        image_size=IMAGE_SIZE, embedding_dim=EMBED_DIM, tokens_per_image=50, logit_scale=100.0,
        visual=EncoderSpec(file="visual.onnx", input="pixel_values", output="image_embeds"),
        text=TextEncoderSpec(file="textual.onnx", input="input_ids", output="text_embeds"),
        tokenizer=TokenizerSpec(file="tokenizer.json", context_length=CONTEXT, pad_id=vocab["<pad>"]),
    )
    _visual_model(red_embed, green_embed, blue_embed, other, manifest.mean, manifest.std, out_dir / "visual.onnx", busy_layers)
    _text_model(table, out_dir / "textual.onnx")
    _build_tokenizer(vocab, out_dir / "tokenizer.json")
    for name in ("visual.onnx", "textual.onnx", "tokenizer.json"):
        path = out_dir / name
        manifest.files[name] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    write_manifest(out_dir, manifest)
    return manifest
