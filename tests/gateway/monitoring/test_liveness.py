"""`/health`'s reading of Redis (`gateway.monitoring.liveness`) on a real Valkey: it counts
the live and ready workers, answers at once while Redis stalls (no round trip in the
route), then says 503 once no read has succeeded for `STALE_S`, and 503 at once when Redis
refuses connections."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.net import free_port
from common.redis_conn import RedisTarget
from common.registry import WorkerInfo, WorkerState
from corral.redis_server import EmbeddedRedis
from gateway.monitoring import liveness as liveness_mod
from gateway.monitoring.liveness import Liveness
from gateway.routes.health import health


def _register(r: redis.Redis, worker_id: str, state: WorkerState) -> None:
    info = WorkerInfo(id=worker_id, host="h", pid=1, slots=2, state=state, model="m")
    r.sadd(redis_keys.WORKERS, worker_id)
    r.set(redis_keys.worker_key(worker_id), info.model_dump_json(), px=60_000)


def _state(live: Liveness) -> SimpleNamespace:
    return SimpleNamespace(liveness=live, hub=SimpleNamespace(ready=True, active=0), draining=False)


async def _health(live: Liveness) -> tuple[int, dict[str, object]]:
    reply = await asyncio.wait_for(health(_state(live)), 1.0)  # type: ignore[arg-type]
    return reply.status_code, json.loads(bytes(reply.body))


def test_health_counts_live_and_ready_workers(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    _register(r, "w-ready", WorkerState.READY)
    _register(r, "w-loading", WorkerState.LOADING)
    r.sadd(redis_keys.WORKERS, "w-gone")  # its entry expired: not counted, and pruned

    async def main() -> tuple[int, dict[str, object]]:
        live = Liveness.of(RedisTarget(own_redis.url))
        try:
            await live.refresh()
            return await _health(live)
        finally:
            await live.stop()

    status, body = asyncio.run(main())
    assert status == 200
    assert (body["workers"], body["ready_workers"], body["redis"]) == (2, 1, True)
    assert not r.sismember(redis_keys.WORKERS, "w-gone")


def test_health_answers_while_redis_stalls_then_says_it_is_away(
    own_redis: EmbeddedRedis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis paused (every command waits): the route answers from the last reading, and
    once no read has succeeded for STALE_S it answers 503."""
    monkeypatch.setattr(liveness_mod, "STALE_S", 0.6)
    monkeypatch.setattr(liveness_mod, "REFRESH_S", 0.1)
    _register(r, "w", WorkerState.READY)

    async def main() -> list[int]:
        live = Liveness.of(RedisTarget(own_redis.url))
        await live.refresh()
        live.start()
        try:
            r.execute_command("CLIENT", "PAUSE", "2500", "ALL")
            during = [(await _health(live))[0]]
            await asyncio.sleep(1.0)
            during.append((await _health(live))[0])
            return during
        finally:
            r.execute_command("CLIENT", "UNPAUSE")
            await live.stop()

    assert asyncio.run(main()) == [200, 503]


def test_health_is_503_when_redis_refuses_connections() -> None:
    async def main() -> tuple[int, dict[str, object]]:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}")
        live = Liveness(client)
        try:
            await live.refresh()
            return await _health(live)
        finally:
            await live.stop()

    status, body = asyncio.run(main())
    assert status == 503 and body["redis"] is False and "Error" in str(body["error"])
