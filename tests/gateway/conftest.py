"""Fixtures for the gateway's unit tests that empty Redis between tests: they run on a
Valkey of their module's own, never on the session's shared `redis_server`, where the
end-to-end clusters live."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from corral.redis_server import EmbeddedRedis


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
