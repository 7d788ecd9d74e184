"""`corral.local`: the running `corral up` as the CLI finds it (its lock names a live corral
process), the local admin key (made once, readable by its owner only), the key a client
command sends, and what the banner says about access."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from common import redis_keys
from common.settings import ModelConfig, Settings
from corral import local
from corral.banner import banner
from corral.redis_server import EmbeddedRedis

ADMIN = "sk-corral-the-admin-key"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line names corral, as `corral up`'s does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "corral"])
    yield proc
    proc.kill()
    proc.wait()


def run_files(data_dir: Path, pid: int) -> None:
    (data_dir / "run").mkdir(parents=True)
    (data_dir / local.LOCK_FILE).write_text(str(pid))
    (data_dir / local.RUN_CONFIG).write_text("redis_url: redis://127.0.0.1:1/0\n")


def test_a_running_corral_up_is_found_by_its_lock(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    assert local.running_config(tmp_path) is None  # nothing ran here
    run_files(tmp_path, sleeper.pid)
    assert local.running_config(tmp_path) == tmp_path / local.RUN_CONFIG


def test_a_stale_lock_is_not_a_running_corral_up(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])  # alive, but not corral: a reused pid
    try:
        gone = tmp_path / "gone"
        run_files(gone, 2**22 + 1)  # above any pid_max: no such process
        assert local.running_config(gone) is None
        reused = tmp_path / "reused"
        run_files(reused, other.pid)
        assert local.running_config(reused) is None
    finally:
        other.kill()
        other.wait()


def test_the_local_admin_key_is_made_once_and_private(tmp_path: Path) -> None:
    secret, made = local.ensure_admin_key(tmp_path)
    path = local.admin_key_path(tmp_path)
    assert made and secret.startswith("sk-corral-") and len(secret) > 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert local.ensure_admin_key(tmp_path) == (secret, False)
    path.chmod(0o644)  # loosened by hand: made private again
    assert local.ensure_admin_key(tmp_path) == (secret, False)
    assert path.stat().st_mode & 0o777 == 0o600
    assert local.read_admin_key(tmp_path / "elsewhere") is None


def test_corral_up_runs_with_the_local_key_unless_given_one(tmp_path: Path) -> None:
    settings, made = local.with_local_admin_key(Settings(data_dir=tmp_path))
    assert made and settings.open_until_user_keys
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == local.read_admin_key(tmp_path)
    given = Settings(data_dir=tmp_path / "other", admin_key=SecretStr(ADMIN))
    assert local.with_local_admin_key(given) == (given, False)  # closes the gateway, as ever
    assert local.read_admin_key(tmp_path / "other") is None


def test_the_key_a_client_sends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    secret, _ = local.ensure_admin_key(tmp_path)

    def sent(**fields: object) -> str | None:
        key = local.client_key(Settings(data_dir=tmp_path, **fields)).admin_key  # type: ignore[arg-type]
        return key.get_secret_value() if key else None

    assert sent() is None  # a config that is not a `corral up` run's: no local key
    assert sent(open_until_user_keys=True) == secret  # the run config of `corral up`
    assert sent(open_until_user_keys=True, admin_key=SecretStr(ADMIN)) == ADMIN
    monkeypatch.setenv("CORRAL_API_KEY", "sk-corral-alias")
    assert sent(open_until_user_keys=True) == "sk-corral-alias"
    assert sent(admin_key=SecretStr(ADMIN)) == ADMIN  # CORRAL_ADMIN_KEY comes first


def test_the_data_dir_flag_shown_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("CORRAL_DATA_DIR", raising=False)
    assert local.data_dir_flag(tmp_path / "corral") == ""
    assert local.data_dir_flag(tmp_path / "my data") == f" --data-dir '{tmp_path}/my data'"
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "my data"))
    assert local.data_dir_flag(tmp_path / "my data") == ""


def test_the_banner_names_the_key_and_when_the_curl_line_needs_it(
    tmp_path: Path, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path))
    url = redis_server.url.rsplit("/", 1)[0] + "/7"  # a database of its own
    settings, _ = local.with_local_admin_key(Settings(data_dir=tmp_path))
    secret = local.read_admin_key(tmp_path)
    assert secret is not None
    models = {"chat": ModelConfig(model_path=Path("/m.gguf"), preload=True)}

    first = banner(settings, models, url, key_made=True)
    assert secret in first and "shown this once" in first and "corral keys admin" in first
    assert "Authorization" not in first  # open on loopback: the line works as is
    assert f"redis:     {url}" in first
    later = banner(settings, models, url, key_made=False)
    assert secret not in later and str(local.admin_key_path(tmp_path)) in later

    client = redis.Redis.from_url(url)
    try:
        client.hset(redis_keys.API_KEYS, "a-digest", "{}")
        keyed = banner(settings, models, url, key_made=False)
        assert '-H "Authorization: Bearer $(corral keys admin)"' in keyed
        assert "user keys exist" in keyed
    finally:
        client.flushdb()
        client.close()
    given = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN))
    assert "Bearer $CORRAL_ADMIN_KEY" in banner(given, models, url, key_made=False)
