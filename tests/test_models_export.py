"""`streamguard models export`: a Hugging Face CLIP directory and `--random-init`
architectures become bundles whose ONNX graphs match the framework, load with
the project's ClipModel with any batch size, and (shape-real ones) make
`serve`/`scan` warn. Needs the `export` extra (torch, transformers), which CI
installs; tiny configs keep it fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # the `export` extra: .ci/run installs it, so these tests run in CI
import transformers

from streamguard.config import ModelSettings
from streamguard.inference.bundle import read_manifest, sha256_file
from streamguard.inference.clip import ClipModel

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEXTS = ["a photo of a dog", "people fighting", "a slide"]


def _clip_tokenizer(path: Path) -> int:
    """A real CLIPTokenizerFast over a tiny byte-level vocabulary (no merges),
    saved the way save_pretrained does. Returns the end-of-text id."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if int(transformers.__version__.split(".")[0]) >= 5:
        tok = transformers.CLIPTokenizerFast(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    else:
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n")
        tok = transformers.CLIPTokenizerFast(vocab_file=str(path / "vocab.json"),
                                             merges_file=str(path / "merges.txt"), pad_token="<|endoftext|>")
    assert tok.eos_token_id == vocab["<|endoftext|>"] and len(set(tok("a dog").input_ids)) > 3
    tok.save_pretrained(str(path))
    return vocab["<|endoftext|>"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP saved with save_pretrained, with its tokenizer and a
    preprocessor config whose mean/std differ from OpenAI's."""
    path = tmp_path_factory.mktemp("hf-clip")
    eos = _clip_tokenizer(path)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=eos + 1, eos_token_id=eos, bos_token_id=eos - 1,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=16, image_size=64),
        projection_dim=24)
    torch.manual_seed(1)
    transformers.CLIPModel(config).save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 64, "width": 64}, "image_mean": MEAN, "image_std": STD}))
    return path


def _reference(src: Path, crops: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The framework's own projected embeddings, L2-normalised, preprocessing
    done here independently of the project's."""
    clip = transformers.CLIPModel.from_pretrained(str(src)).eval()
    pixels = (crops.astype(np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    with torch.no_grad():
        img = clip.visual_projection(clip.vision_model(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).pooler_output).numpy()
        txt = clip.text_projection(clip.text_model(input_ids=torch.from_numpy(ids)).pooler_output).numpy()
    return (img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True))


def test_export_hf_round_trip(cli, hf_dir, tmp_path):
    dest = tmp_path / "bundle"
    res = cli("models", "export", hf_dir, "--dest", dest, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "max abs diff" in res.stdout and "cosine" in res.stdout
    m = read_manifest(dest)
    assert (m.image_size, m.tokens_per_image, m.embedding_dim) == (64, (64 // 16) ** 2 + 1, 24)
    assert m.mean == pytest.approx(MEAN) and m.std == pytest.approx(STD)
    assert not m.shape_real and m.text.attention_mask == ""
    for name in ("visual.onnx", "textual.onnx", "tokenizer.json"):
        assert m.files[name].sha256 == sha256_file(dest / name)

    # The project's loader, batch 3 (the graphs were traced at batch 2).
    model = ClipModel(dest, ModelSettings(providers="cpu"), tmp_path / "cache")
    crops = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    img = model.encode_images(crops)
    txt, tokens = model.encode_texts(TEXTS)
    assert img.shape == (3, 24) and txt.shape == (3, 24) and tokens > len(TEXTS) * 2
    ids, _ = model.tokenize(TEXTS)
    assert len({tuple(row) for row in ids}) == len(TEXTS)  # the real tokenizer came along, not a stand-in
    ref_img, ref_txt = _reference(hf_dir, crops, ids)
    assert np.abs(img - ref_img).max() < 1e-4 and np.abs(txt - ref_txt).max() < 1e-4
    assert (img * ref_img).sum(axis=1).min() > 0.9999 and (txt * ref_txt).sum(axis=1).min() > 0.9999


def test_export_refuses_a_disagreeing_graph(hf_dir, tmp_path):
    """Disagreement beyond tolerance: exit 1, one line with the figures, no manifest left."""
    dest = tmp_path / "bundle"
    code = ("import sys; from streamguard.inference import export; export.MAX_ABS_DIFF = -1.0; "
            "from streamguard.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "models", "export", str(hf_dir), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamguard: error:") and "max abs diff" in lines[0], proc.stderr
    assert not (dest / "manifest.json").exists()


def test_random_init_bundle_is_marked_and_scan_warns(cli, tmp_path):
    from videos import make_video

    dest = tmp_path / "shape-real"
    res = cli("models", "export", "--random-init", "tiny", "--dest", dest, timeout=300)
    assert res.returncode == 0, res.stderr
    m = read_manifest(dest)
    assert m.shape_real and "NOT A MODEL" in m.description and m.tokens_per_image == 50
    assert json.loads(cli("models", "inspect", dest).stdout)["shape_real"] is True
    video = make_video(tmp_path / "v.mp4", seconds=2, fps=10, width=160, height=120, audio=False)
    scan = cli("scan", video, "--moderate", "--segment-seconds", "2", "--model", dest, "--data-dir", tmp_path)
    assert scan.returncode == 0, scan.stderr
    assert len(scan.records) == 1 and scan.records[0]["data"]["data"]["content_moderation"]["frames_processed"] >= 1
    assert scan.stderr.count("has random weights: it is not a model") == 1, scan.stderr


def test_vit_b_32_is_the_real_architecture():
    from streamguard.inference.export import random_clip

    clip = random_clip("vit-b-32")
    params = sum(p.numel() for p in clip.parameters())
    assert 149e6 < params < 153e6  # OpenAI CLIP ViT-B/32: 151.3 M
    v, t = clip.config.vision_config, clip.config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (768, 12, 32, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.vocab_size) == (512, 12, 77, 49408)
    assert clip.config.projection_dim == 512


def test_without_the_extra_export_names_the_pip_command(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; "
            "from streamguard.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "models", "export", "--random-init", "tiny",
                           "--dest", str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'streamguard[export]'" in lines[0], proc.stderr


def test_runtime_never_imports_torch():
    code = ("import sys; import streamguard.cli, streamguard.api.serve, streamguard.services.scan, "
            "streamguard.inference.export, streamguard.inference.clip; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_hf_dir_without_tokenizer_is_refused(hf_dir, tmp_path):
    """transformers would build an empty tokenizer from the model type; export says what is missing."""
    import shutil

    from streamguard.errors import ModelError
    from streamguard.inference.export import export_hf

    src = tmp_path / "no-tokenizer"
    src.mkdir()
    for f in hf_dir.iterdir():
        if f.name in ("config.json", "preprocessor_config.json") or f.suffix == ".safetensors":
            shutil.copy2(f, src / f.name)
    with pytest.raises(ModelError, match="has no tokenizer"):
        export_hf(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_make_shape_real_bundle_builds_once(tmp_path, test_bundle):
    from streamguard.errors import ModelError
    from streamguard.inference.export import make_shape_real_bundle

    dest = tmp_path / "sr"
    m = make_shape_real_bundle(dest, "tiny")
    assert m.shape_real and m.name == "shape-real-tiny"
    stamp = (dest / "visual.onnx").stat().st_mtime_ns
    assert make_shape_real_bundle(dest, "tiny") == m and (dest / "visual.onnx").stat().st_mtime_ns == stamp
    with pytest.raises(ModelError, match="holds another bundle"):
        make_shape_real_bundle(test_bundle, "tiny")
    assert not read_manifest(test_bundle).shape_real  # manifests from before the field load as real models
