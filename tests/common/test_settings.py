from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.celery_config import celery_config
from common.settings import ModelConfig, Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CORRAL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_work_without_a_config_file() -> None:
    s = load_settings()
    assert s.port == 8000 and s.host == "127.0.0.1"
    assert s.redis_url is None
    assert s.visibility_timeout == 2 * s.task_time_limit


def test_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(
        tmp_path / "c.yaml",
        "port: 9000\nrequest_timeout: 30\nmodels_dir: weights\n"
        "models:\n  qwen:\n    model_path: qwen.gguf\n    parallel: 4\n",
    )
    monkeypatch.setenv("CORRAL_REQUEST_TIMEOUT", "45")
    monkeypatch.setenv("CORRAL_MODELS__QWEN__PARALLEL", "8")
    s = load_settings(cfg, port=9100)
    assert s.port == 9100  # flag over file
    assert s.request_timeout == 45  # env over file
    assert s.models["qwen"].parallel == 8
    # relative model paths resolve against models_dir, itself relative to the config file
    assert s.resolve_model_path(s.models["qwen"]) == tmp_path / "weights" / "qwen.gguf"


def test_corral_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path / "other.yaml", "port: 9300\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(cfg))
    assert load_settings().port == 9300


def test_a_named_config_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


def test_unknown_model_fields_are_refused(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", "models:\n  m:\n    model_path: m.gguf\n    slots: 2\n")
    with pytest.raises(ValidationError):
        load_settings(cfg)


def test_unsafe_visibility_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout"):
        load_settings(task_time_limit=100, visibility_timeout=150)


def test_production_needs_a_redis_url() -> None:
    with pytest.raises(ValidationError, match="CORRAL_REDIS_URL"):
        load_settings(environment="production")


def test_celery_config_keeps_the_promises() -> None:
    conf = celery_config(load_settings(redis_url="redis://x:1/0", task_time_limit=50))
    assert conf["broker_transport_options"]["queue_order_strategy"] == "sorted"
    assert conf["broker_transport_options"]["visibility_timeout"] >= 100
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_ignore_result"] is True
    assert conf["accept_content"] == ["json"]


def test_edge_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 5: CORS off by default; origins comma-separated or JSON; an empty admin key
    is no key; the admin key never shows in a repr."""
    assert load_settings().cors_origins == [] and load_settings().admin_key is None
    monkeypatch.setenv("CORRAL_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("CORRAL_ADMIN_KEY", "")
    s = load_settings()
    assert s.cors_origins == ["https://a.example", "https://b.example"] and s.admin_key is None
    monkeypatch.setenv("CORRAL_CORS_ORIGINS", '["https://c.example"]')
    monkeypatch.setenv("CORRAL_ADMIN_KEY", "sk-admin-secret")
    s = load_settings()
    assert s.cors_origins == ["https://c.example"]
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "sk-admin-secret"
    assert "sk-admin-secret" not in repr(s) and "sk-admin-secret" not in s.model_dump_json()


def test_data_and_models_dirs_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`corral up --data-dir rel` handed "rel/models/x.gguf" to workers, which resolved it
    against their models dir once more ("rel/models/rel/models/x.gguf")."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=Path("rel"), models_dir=Path("mods"))
    assert settings.data_dir == tmp_path / "rel"
    assert settings.models_dir == tmp_path / "mods"
    demo = ModelConfig(model_path=settings.data_dir / "models" / "x.gguf")
    assert settings.resolve_model_path(demo) == tmp_path / "rel" / "models" / "x.gguf"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("gw.internal", "http://gw.internal:8000"),
    ],
)
def test_the_gateways_url_on_this_machine(host: str, url: str) -> None:
    """`corral up --host ::1` built "http://::1:8000" and died on it."""
    assert Settings(host=host).local_url() == url


def test_an_env_variable_names_a_model_with_dots_and_dashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's example: CORRAL_MODELS__QWEN2_5_7B__PARALLEL=8 for the model `qwen2.5-7b`
    (it made a second, incomplete model `qwen2_5_7b` and the config was refused)."""
    cfg = tmp_path / "corral.yaml"
    cfg.write_text("models:\n  qwen2.5-7b:\n    model_path: /m/qwen.gguf\n    parallel: 2\n")
    monkeypatch.setenv("CORRAL_MODELS__QWEN2_5_7B__PARALLEL", "8")
    settings = load_settings(cfg)
    assert list(settings.models) == ["qwen2.5-7b"]
    assert settings.models["qwen2.5-7b"].parallel == 8
    assert settings.models["qwen2.5-7b"].model_path == Path("/m/qwen.gguf")
