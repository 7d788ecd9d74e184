"""`common.redis_conn`: the Redis URL forms (plain, and kombu's Sentinel form) and clients
made through a real Sentinel (a Valkey primary and one sentinel, both with passwords)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from common.celery_config import celery_config
from common.redis_conn import RedisTarget
from common.settings import load_settings
from tests.support import SentinelSet

URL = "sentinel://:p%40ss@s1:26380/2;sentinel://s2;sentinel://[::1]:26381"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("CORRAL_")]:
        monkeypatch.delenv(name)


def test_a_plain_url_is_used_as_is() -> None:
    target = RedisTarget("redis://:secret@h:6379/1")
    assert not target.is_sentinel and target.kombu_options() == {}
    assert asyncio.run(target.master_url()) == "redis://:secret@h:6379/1"
    assert str(target) == "redis://:***@h:6379/1"


def test_kombus_sentinel_form() -> None:
    target = RedisTarget(URL, "mymaster", "sentinel-secret")
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    options = target.kombu_options()
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert str(target) == URL.replace("p%40ss", "***") + " (master mymaster)"
    assert "sentinel-secret" not in repr(target)


@pytest.mark.parametrize(
    ("url", "master", "error"),
    [
        ("sentinel://s1:26379", None, "redis_sentinel_master"),
        ("sentinel://s1:26379;redis://h:6379", "m", "not a sentinel://HOST:PORT URL"),
        ("sentinel://s1:port", "m", "bad sentinel URL"),
        ("sentinel://s1:26379/zero", "m", "must be a number"),
        ("sentinel://s1:26379;sentinel://s2:26379/0", "m", "on the first sentinel:// URL"),
        ("sentinel://s1;sentinel://:pw@s2", "m", "on the first sentinel:// URL"),
    ],
)
def test_a_bad_sentinel_url_is_refused(url: str, master: str | None, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RedisTarget(url, master)


def test_settings_refuse_a_sentinel_url_without_its_master(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CORRAL_REDIS_URL", "sentinel://s1:26379")
    monkeypatch.setenv("CORRAL_REDIS_SENTINEL_MASTER", "")  # as `${VAR:-}` leaves it
    with pytest.raises(ValidationError, match="redis_sentinel_master"):
        load_settings()
    monkeypatch.setenv("CORRAL_REDIS_SENTINEL_MASTER", "mymaster")
    monkeypatch.setenv("CORRAL_REDIS_SENTINEL_PASSWORD", "pw")
    settings = load_settings()
    options = celery_config(settings)["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["password"] == "pw"
    assert options["queue_order_strategy"] == "sorted"  # the rest is kept


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    root = tmp_path_factory.mktemp("sentinel")
    with SentinelSet(
        root, "unit", sentinels=1, replica=False, password="m@ster pw", sentinel_password="s pw"
    ) as group:
        yield group


def _target(group: SentinelSet) -> RedisTarget:
    return RedisTarget(group.url, group.master, "s pw")


def test_blocking_client_through_sentinel(sentinel: SentinelSet) -> None:
    with _target(sentinel).client(decode_responses=True) as client:
        client.set("k", "v")
        assert client.get("k") == "v"
        port = client.connection_pool.get_master_address()[1]
    assert port == sentinel.primary.port


def test_async_client_and_master_url_through_sentinel(sentinel: SentinelSet) -> None:
    async def main() -> tuple[str, object]:
        client = _target(sentinel).async_client(max_connections=4, timeout=5, decode_responses=True)
        try:
            await client.set("a", "1")
            got = await client.get("a")
        finally:
            await client.aclose()
        return await _target(sentinel).master_url(), got

    url, got = asyncio.run(main())
    assert got == "1"
    # The password quoted, so a URL parser reads it back whole.
    assert url == f"redis://:m%40ster%20pw@127.0.0.1:{sentinel.primary.port}/0"
    with redis.Redis.from_url(url) as direct:
        assert direct.ping()


def test_wrong_sentinel_password_fails_clearly(sentinel: SentinelSet) -> None:
    target = RedisTarget(sentinel.url, sentinel.master, "wrong")
    with target.client(socket_timeout=1) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_unknown_master_fails_clearly(sentinel: SentinelSet, tmp_path: Path) -> None:
    target = RedisTarget(sentinel.url, "nobody", "s pw")
    with target.client() as client, pytest.raises(redis.ConnectionError, match="nobody"):
        client.ping()
