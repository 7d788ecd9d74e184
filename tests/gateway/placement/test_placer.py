"""The gateway's placement mechanics (`gateway.placement.placer`) on a real Valkey, with registry
entries written by the test instead of worker processes: the lock, the commands, and what
a waiting request is told. (tests/test_models_cluster.py runs the same on real workers.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.commands import WorkerCommand
from common.errors import NoCapacity, Timeout
from common.registry import WorkerInfo, WorkerState
from common.settings import ModelConfig, Settings
from corral.redis_server import EmbeddedRedis
from gateway.catalog import Catalog
from gateway.placement.placer import Placer
from gateway.streaming.hub import Subscription


class _Hub:
    def close(self, request_id: str) -> None:
        pass


def sub(deadline_in: float = 60.0) -> Subscription:
    return Subscription(_Hub(), f"req_{time.monotonic_ns()}", time.time() + deadline_in)  # type: ignore[arg-type]


def register(r: redis.Redis, **fields: Any) -> WorkerInfo:
    info = WorkerInfo.model_validate({"host": "h", "pid": 1, "slots": 2, **fields})
    r.set(redis_keys.worker_key(info.id), info.model_dump_json(), px=60_000)
    r.sadd(redis_keys.WORKERS, info.id)
    return info


def commands(r: redis.Redis, worker_id: str) -> list[WorkerCommand]:
    raw = r.lrange(redis_keys.worker_commands(worker_id), 0, -1)
    return [WorkerCommand.model_validate_json(c) for c in raw]


def run(
    own_redis: EmbeddedRedis, body: Callable[[Placer], Awaitable[None]], **settings: Any
) -> None:
    model = ModelConfig(model_path=Path("/nonexistent/m.gguf"), vram_mb=50)
    big = ModelConfig(model_path=Path("/nonexistent/big.gguf"), vram_mb=5000)
    conf = Settings(redis_url=own_redis.url, models={"m": model, "big": big}, **settings)

    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        placer = Placer(conf, client, Catalog(conf, client))
        await placer.start()
        try:
            await body(placer)
        finally:
            await placer.stop()
            await client.aclose()

    asyncio.run(main())


def test_ten_concurrent_cold_requests_send_one_load(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    register(r, id="w1", state=WorkerState.EMPTY, budget_mb=100)
    register(r, id="w2", state=WorkerState.EMPTY, budget_mb=100)

    async def body(placer: Placer) -> None:
        await asyncio.gather(*(placer.ensure("m", sub()) for _ in range(10)))
        await asyncio.sleep(0.6)  # a few watcher ticks: still one load in flight

    run(own_redis, body)
    sent = commands(r, "w1") + commands(r, "w2")
    assert [(c.op.value, c.model) for c in sent] == [("load", "m")]
    assert r.get(redis_keys.placement_lock("m")) == sent[0].lock  # held until the worker takes it


def test_too_big_for_every_budget_raises_at_once(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    register(r, id="w1", state=WorkerState.EMPTY, budget_mb=100)

    async def body(placer: Placer) -> None:
        with pytest.raises(NoCapacity, match=r"needs 5000 MiB .* largest device budget is 100"):
            await placer.ensure("big", sub())

    run(own_redis, body)
    assert commands(r, "w1") == []


def test_a_load_failure_reaches_the_waiting_request(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    register(r, id="w1", state=WorkerState.EMPTY, budget_mb=100)

    async def body(placer: Placer) -> None:
        waiting = sub()
        await placer.ensure("m", waiting)
        # the worker takes the load (releasing the lock), then reports the failure
        r.delete(redis_keys.placement_lock("m"))
        register(
            r,
            id="w1",
            state=WorkerState.EMPTY,
            budget_mb=100,
            failed={"m": "load failed: bad magic"},
        )
        with pytest.raises(NoCapacity, match="bad magic") as err:
            await asyncio.wait_for(waiting.next(), 5)
        assert err.value.code == "model_failed"

    run(own_redis, body)


def test_waiting_is_bounded_by_load_timeout(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    register(
        r,
        id="w1",
        state=WorkerState.READY,
        model="x",
        pinned=True,
        budget_mb=100,
        loaded_at=time.time(),
    )

    async def body(placer: Placer) -> None:
        waiting = sub()
        started = time.monotonic()
        await placer.ensure("m", waiting)  # nothing can be evicted: it waits in its queue
        with pytest.raises(Timeout, match=r"load_timeout .*pinned") as err:
            await asyncio.wait_for(waiting.next(), 10)
        assert err.value.status == 504
        assert 1.0 <= time.monotonic() - started < 5

    run(own_redis, body, load_timeout=1.0)
    assert commands(r, "w1") == []


def test_eject_and_reset_command_the_holders(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    register(r, id="w1", state=WorkerState.READY, model="m", budget_mb=100)
    register(r, id="w2", state=WorkerState.EMPTY, budget_mb=100, failed={"m": "crashed 3x"})

    async def body(placer: Placer) -> None:
        assert await placer.eject("m") == ["w1"]
        assert await placer.reset("m") == {"w2": "crashed 3x"}

    run(own_redis, body)
    assert [c.op.value for c in commands(r, "w1")] == ["unload"]
    assert [c.op.value for c in commands(r, "w2")] == ["reset"]
    assert r.sismember(redis_keys.EJECTED, "m")
    # still there for a manager busy with a load as long as `load_timeout` (it was 60 s)
    assert r.ttl(redis_keys.worker_commands("w1")) > 2 * Settings().load_timeout
