"""ONNX Runtime session set-up on CPU: threads, options, and the optimised
graph saved on first load and loaded from disk afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from streamguard.config import ModelSettings
from streamguard.inference import session as session_mod
from streamguard.inference.clip import ClipModel
from streamguard.inference.testmodel import EMBED_DIM

from test_model_scoring import frames_with_red_fraction

CPU = [("CPUExecutionProvider", {})]


@pytest.mark.parametrize("cores,threads", [(1, 1), (2, 2), (3, 3), (4, 3), (16, 15)])
def test_auto_threads_leave_a_core_to_ingest_from_four_cores(monkeypatch, cores, threads):
    monkeypatch.setattr(session_mod.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert session_mod.cpu_threads_auto() == threads


def test_cpu_options(monkeypatch):
    monkeypatch.setattr(session_mod, "cpu_threads_auto", lambda: 5)
    opts = session_mod._session_options(CPU, 0)
    assert opts.intra_op_num_threads == 5 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.enable_cpu_mem_arena and opts.enable_mem_pattern
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_mod._session_options(CPU, 3).intra_op_num_threads == 3  # config wins
    assert session_mod._session_options(CPU, 3, spin=True).get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"


def _opened(monkeypatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    real = session_mod._open

    def spy(path, opts, providers):
        calls.append((Path(path).name, opts.graph_optimization_level))
        return real(path, opts, providers)
    monkeypatch.setattr(session_mod, "_open", spy)
    return calls


def test_optimized_graph_saved_once_then_loaded(test_bundle, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    saved = sorted(p.name for p in (cache / "ort").iterdir())
    assert len(saved) == 2 and all(f"ort{ort.__version__}-cpu-" in n for n in saved)
    assert {n.split("-")[0] for n in saved} == {"visual", "textual"}
    calls = _opened(monkeypatch)
    second = ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    assert sorted(c[0] for c in calls) == saved
    assert all(level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL for _, level in calls)
    frames = frames_with_red_fraction([1.0, 0.3])
    assert np.allclose(first.encode_images(frames), second.encode_images(frames), atol=1e-6)


def test_damaged_cached_graph_is_rebuilt(test_bundle, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    visual = next((cache / "ort").glob("visual-*.onnx"))
    visual.write_bytes(b"garbage")
    model = ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    assert model.encode_images(frames_with_red_fraction([1.0])).shape == (1, EMBED_DIM)
    assert visual.stat().st_size > 100  # saved again


def test_changed_model_file_gets_its_own_entry_and_other_versions_are_pruned(test_bundle, tmp_path):
    cache = tmp_path / "cache"
    ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    stale = next((cache / "ort").glob("visual-*.onnx"))
    older = stale.with_name(stale.name.replace(f"ort{ort.__version__}", "ort1.0.0"))
    shutil.copy(stale, older)
    stale.unlink()
    ClipModel(test_bundle, ModelSettings(providers="cpu"), cache)
    assert stale.is_file() and not older.exists()


def test_save_optimized_off_writes_nothing(test_bundle, tmp_path):
    ClipModel(test_bundle, ModelSettings(providers="cpu", save_optimized=False), tmp_path / "cache")
    assert not (tmp_path / "cache" / "ort").exists()
