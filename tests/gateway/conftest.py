"""Fixtures for the gateway's tests.

- Unit tests that empty Redis between tests run on a Valkey of their module's own
  (`own_redis`, `r`), never on the session's shared `redis_server`, where the end-to-end
  clusters live.
- Tests of API keys run a gateway with the admin key (`gw`) beside the shared cluster, and
  drop every key after each test (`no_keys_left`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from corral.redis_server import EmbeddedRedis
from tests.conftest import Cluster
from tests.gateway.helpers import ADMIN_KEY, drop_keys, start_gateway


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def r(own_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of `own_redis`, emptied first."""
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def gw(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A gateway with the admin key, on the shared cluster's Valkey and workers."""
    running = start_gateway(
        cluster.redis_url, tmp_path_factory.mktemp("keyed-gw"), CORRAL_ADMIN_KEY=ADMIN_KEY
    )
    yield running
    running.stop()


@pytest.fixture
def no_keys_left(redis_server: EmbeddedRedis) -> Iterator[None]:
    """No key outlives the test: the shared gateway runs open only while none exist."""
    yield
    drop_keys(redis_server.url)
