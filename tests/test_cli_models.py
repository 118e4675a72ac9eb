"""`streamguard models ...` through the real command line."""

import json


def test_make_test_then_inspect(cli, tmp_path):
    res = cli("models", "make-test", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"manifest.json", "visual.onnx", "textual.onnx",
                                                            "tokenizer.json"}
    info = cli("models", "inspect", tmp_path / "b")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["name"] == "streamguard-test" and data["tokens_per_image"] == 50


def test_list_shows_sources_and_local_bundles(cli, tmp_path):
    assert cli("models", "make-test", tmp_path / "models" / "mine").returncode == 0
    res = cli("models", "list", "--data-dir", tmp_path)
    assert res.returncode == 0
    assert "clip-vit-b32" in res.stdout and str(tmp_path / "models" / "mine") in res.stdout


def test_pull_unreachable_hub_is_one_clear_line(cli, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = cli("models", "pull", "clip-vit-b32", "--dest", tmp_path / "m", "--base-url", f"http://127.0.0.1:{port}/")
    assert res.returncode == 1
    assert res.stderr.startswith("streamguard: error:") and "Traceback" not in res.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()
