"""The response cache against a real Valkey: a model whose cache is off costs no Redis
call, hits and misses, the per-model bound on entries (oldest go first), entries too large
to keep, and Redis trouble read as a miss."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.requests import Request

from common import redis_keys
from common.jobs import JobKind
from common.settings import ModelConfig
from corral.redis_server import EmbeddedRedis
from gateway.cache import ResponseCache
from gateway.cache.store import StreamFill
from gateway.monitoring.metrics import GatewayMetrics

BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
REPLY = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {}}]}


def request(**headers: str) -> Request:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "state": {"request_id": "req_t"}})


def model(**cache: Any) -> ModelConfig:
    return ModelConfig.model_validate({"model_path": "/m/tiny.gguf", "cache": cache or None})


Main = Callable[[aioredis.Redis], Awaitable[None]]


@pytest.fixture
def on_redis(own_redis: EmbeddedRedis) -> Callable[[Main], None]:
    """Run `main(client)` on an emptied Valkey."""

    def run(main: Main) -> None:
        async def whole() -> None:
            client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
            await client.flushall()
            try:
                await main(client)
            finally:
                await client.aclose()

        asyncio.run(whole())

    return run


async def fill(cache: ResponseCache, alias: str, config: ModelConfig, body: dict[str, Any]) -> None:
    found = await cache.lookup(request(), alias, config, JobKind.CHAT, body)
    assert found.hit is None and found.keep is not None
    found.keep(REPLY)
    await cache.stop()


def test_off_model_costs_no_redis_call() -> None:
    async def main() -> None:
        nowhere = aioredis.Redis(host="127.0.0.1", port=1)  # any call would fail
        cache = ResponseCache(nowhere, GatewayMetrics())
        found = await cache.lookup(request(), "m", model(), JobKind.CHAT, BODY)
        assert found.headers == {} and found.hit is None and found.keep is None
        assert found.tap() is None
        await nowhere.aclose()

    asyncio.run(main())


def test_hit_after_fill(on_redis: Callable[[Main], None]) -> None:
    async def main(client: aioredis.Redis) -> None:
        metrics = GatewayMetrics()
        cache = ResponseCache(client, metrics)
        config = model(ttl=30)
        await fill(cache, "m", config, BODY)
        found = await cache.lookup(request(), "m", config, JobKind.CHAT, BODY)
        assert found.headers == {"x-corral-cache": "hit"} and found.hit == REPLY
        (key,) = await client.zrange(redis_keys.cache_index("m"), 0, -1)
        assert 25_000 < await client.pttl(str(key)) <= 30_000
        assert metrics.cache_hits.labels(model="m")._value.get() == 1
        assert metrics.cache_stores.labels(model="m")._value.get() == 1
        refresh = await cache.lookup(
            request(cache_control="no-cache"), "m", config, JobKind.CHAT, BODY
        )
        assert refresh.hit is None and refresh.keep is not None  # not read, but kept anew

    on_redis(main)


def test_entries_are_bounded_per_model_oldest_first(on_redis: Callable[[Main], None]) -> None:
    async def main(client: aioredis.Redis) -> None:
        cache = ResponseCache(client, GatewayMetrics())
        config = model(max_entries=3)
        bodies = [{**BODY, "max_tokens": n} for n in range(5)]
        for body in bodies:
            await fill(cache, "m", config, body)
            await asyncio.sleep(0.002)  # distinct times
        assert await client.zcard(redis_keys.cache_index("m")) == 3
        assert len([k async for k in client.scan_iter(redis_keys.cache_key("m", "*"))]) == 3
        for body, kept in zip(bodies, [False, False, True, True, True], strict=True):
            found = await cache.lookup(request(), "m", config, JobKind.CHAT, body)
            assert (found.hit is not None) is kept
        await fill(cache, "other", config, BODY)  # another model's bound is its own
        assert await client.zcard(redis_keys.cache_index("m")) == 3

    on_redis(main)


def test_a_reply_too_large_is_not_kept(on_redis: Callable[[Main], None]) -> None:
    async def main(client: aioredis.Redis) -> None:
        cache = ResponseCache(client, GatewayMetrics())
        config = model(max_entry_bytes=256)
        found = await cache.lookup(request(), "m", config, JobKind.CHAT, BODY)
        assert found.keep is not None
        found.keep({**REPLY, "padding": "x" * 300})
        await cache.stop()
        assert await client.zcard(redis_keys.cache_index("m")) == 0

    on_redis(main)


def test_redis_trouble_is_a_miss() -> None:
    async def main() -> None:
        # no retries: redis-py's default backoff would spend seconds on each refusal
        nowhere = aioredis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
        cache = ResponseCache(nowhere, GatewayMetrics())
        found = await cache.lookup(request(), "m", model(ttl=5), JobKind.CHAT, BODY)
        assert found.headers == {"x-corral-cache": "miss"} and found.hit is None
        assert found.keep is not None
        found.keep(REPLY)  # a fill that fails is logged, not raised
        await cache.stop()
        await nowhere.aclose()

    asyncio.run(main())


def test_stream_fill_keeps_a_finished_stream_within_its_limit() -> None:
    kept: list[dict[str, Any]] = []
    done = ['{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}']
    done += ['{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}']
    fill = StreamFill(JobKind.CHAT, 1000, kept.append)
    fill.add(done)
    fill.done({"total_tokens": 1})
    assert kept[0]["choices"][0]["message"]["content"] == "hi"
    assert kept[0]["usage"] == {"total_tokens": 1}
    big = StreamFill(JobKind.CHAT, 50, kept.append)
    big.add(done)
    big.done(None)
    cut = StreamFill(JobKind.CHAT, 1000, kept.append)
    cut.add(done[:1])  # its client left, or it failed: never finished
    cut.done(None)
    assert len(kept) == 1
