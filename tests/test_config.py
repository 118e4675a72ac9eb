from pathlib import Path

import pytest

from streamguard.config import Settings, env_overrides, load_settings
from streamguard.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_contract():
    s = load_settings(environ={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.storage.data_dir == "./var"
    assert (s.pipeline.segment_seconds, s.pipeline.fps, s.pipeline.threshold) == (5, 1, 0.30)
    assert s.storage.retention_days == 3


def test_shipped_config_file_is_valid_and_documents_the_defaults():
    path = REPO / "config" / "streamguard.toml"
    assert load_settings(path, environ={}) == Settings()
    text = path.read_text()
    for section in ("[server]", "[storage]", "[model]", "[inference]", "[pipeline]"):
        assert section in text


def test_env_overrides_use_double_underscore_paths():
    env = {"STREAMGUARD_SERVER__PORT": "9000", "STREAMGUARD_PIPELINE__THRESHOLD": "0.5",
           "STREAMGUARD_STORAGE__DATA_DIR": "/srv/sg", "STREAMGUARD_CONFIG": "", "OTHER": "x"}
    s = load_settings(environ=env)
    assert s.server.port == 9000
    assert s.pipeline.threshold == 0.5
    assert s.storage.data_dir == "/srv/sg"
    assert env_overrides({"STREAMGUARD_MODEL__FP16": "false"}) == {"model": {"fp16": False}}


def test_per_category_thresholds_from_file_and_env(tmp_path):
    cfg = tmp_path / "sg.toml"
    cfg.write_text("[pipeline.thresholds]\nweapons = 0.5\nharassment = 0.4\n")
    s = load_settings(cfg, environ={"STREAMGUARD_PIPELINE__THRESHOLDS__HARASSMENT": "0.35"})
    assert s.pipeline.thresholds == {"weapons": 0.5, "harassment": 0.35}
    assert load_settings(environ={}).pipeline.thresholds == {}


def test_file_then_env_then_overrides(tmp_path):
    cfg = tmp_path / "sg.toml"
    cfg.write_text("[server]\nport = 7000\nhost = '0.0.0.0'\n")
    s = load_settings(cfg, environ={"STREAMGUARD_SERVER__PORT": "7100"},
                      overrides={"pipeline": {"fps": 4}})
    assert (s.server.host, s.server.port, s.pipeline.fps) == ("0.0.0.0", 7100, 4)


@pytest.mark.parametrize("env,needle", [
    ({"STREAMGUARD_PIPELINE__FPS": "31"}, "fps"),
    ({"STREAMGUARD_SERVER__PORT": "http"}, "port"),
    ({"STREAMGUARD_PIPELINE__NOPE": "1"}, "nope"),
    ({"STREAMGUARD_MODEL__PROVIDERS": "tpu"}, "providers"),
    ({"STREAMGUARD_PIPELINE__THRESHOLDS__GUNZ": "0.5"}, "pipeline.thresholds names an unknown category 'gunz'"),
    ({"STREAMGUARD_PIPELINE__THRESHOLDS__WEAPONS": "2"}, "pipeline.thresholds.weapons must be between 0 and 1"),
    ({"STREAMGUARD_PIPELINE__CATEGORIZATION_TOP_K": "21"}, "categorization_top_k"),
])
def test_invalid_values_are_clear_errors(env, needle):
    with pytest.raises(ConfigError) as exc:
        load_settings(environ=env)
    assert needle in str(exc.value)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})
