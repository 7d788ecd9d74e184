"""The gateway's stream hub (`gateway.streaming.hub.StreamHub`) on a real Valkey, across a lost
pub/sub connection: a request that opens its subscription while the hub reconnects waits
for the new subscription, so a worker's frames reach it (they used to reach nobody, and the
request waited for its deadline); when Redis stays away, the request gets a 503. And a
subscription's sequence across a task that began again."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from common.errors import NoCapacity, StreamBroken
from common.frames import Frame, FrameType
from common.redis_conn import RedisTarget
from corral.redis_server import EmbeddedRedis
from gateway.monitoring.liveness import Liveness
from gateway.routes.health import health
from gateway.streaming import hub
from gateway.streaming.hub import StreamHub, Subscription


def _frame(seq: int, kind: FrameType) -> str:
    return Frame(seq=seq, type=kind, worker="w").model_dump_json(exclude_defaults=True)


def test_a_request_opened_while_reconnecting_hears_its_worker(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    async def main() -> list[FrameType]:
        client = aioredis.Redis.from_url(own_redis.url)
        hub = StreamHub(client, "gw-hub", RedisTarget(own_redis.url))
        await hub.start()
        try:
            assert r.client_kill_filter(_type="pubsub") == 1  # Redis drops the connection
            await asyncio.sleep(0.05)  # the hub has seen it and is reconnecting
            sub = await hub.open("req-1", time.time() + 10)  # waits until subscribed
            channel = hub.channel("req-1")
            assert r.publish(channel, _frame(0, FrameType.START)) == 1
            assert r.publish(channel, _frame(1, FrameType.DONE)) == 1
            got = [(await sub.next()).type for _ in range(2)]
            sub.close()
            return got
        finally:
            await hub.stop()
            await client.aclose()

    assert asyncio.run(main()) == [FrameType.START, FrameType.DONE]


def test_a_request_gets_a_503_while_redis_stays_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub, "READY_WAIT_S", 0.5)
    server = EmbeddedRedis().start()

    async def main() -> NoCapacity | None:
        client = aioredis.Redis.from_url(server.url)
        hub = StreamHub(client, "gw-hub", RedisTarget(server.url))
        await hub.start()
        try:
            server.stop()
            await asyncio.sleep(0.2)
            try:
                await hub.open("req-2", time.time() + 10)
            except NoCapacity as err:
                return err
            return None
        finally:
            await hub.stop()
            await client.aclose()

    err = asyncio.run(main())
    assert err is not None and err.status == 503 and err.code == "redis_unavailable"
    assert err.headers() == {"Retry-After": "2"}


def _run_twice(restartable: bool) -> list[FrameType]:
    """A run's frames, then a second run's from seq 0 (its pool child died; Celery queued
    the task again)."""

    async def main() -> list[FrameType]:
        sub = Subscription(None, "req-3", time.time() + 10, restartable)  # type: ignore[arg-type]
        for seq, kind in [
            (0, FrameType.START),
            (1, FrameType.ACCEPTED),
            (0, FrameType.START),
            (1, FrameType.ACCEPTED),
            (2, FrameType.RESULT),
        ]:
            sub.deliver(Frame(seq=seq, type=kind, worker="w"))
        return [(await sub.next()).type for _ in range(5)]

    return asyncio.run(main())


def test_a_non_streaming_request_takes_a_run_that_began_again() -> None:
    got = _run_twice(restartable=True)
    assert got[-1] is FrameType.RESULT


def test_a_stream_that_began_again_is_broken() -> None:
    """Its client has tokens of the first run already: a second run cannot follow them."""
    with pytest.raises(StreamBroken):
        _run_twice(restartable=False)


def test_health_says_error_while_the_hub_cannot_subscribe(
    own_redis: EmbeddedRedis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis takes no new client (`maxclients` reached) while the gateway's pooled ones
    still work: `/health` used to say ok while every request got a 503."""
    monkeypatch.setattr(hub, "SUBSCRIBE_TIMEOUT_S", 0.5)

    async def main() -> tuple[int, int]:
        client = aioredis.Redis.from_url(own_redis.url)
        await client.ping()  # a pooled connection, kept
        hub = StreamHub(client, "gw-hub", RedisTarget(own_redis.url))
        await hub.start()
        liveness = Liveness(client, owns_client=False)
        await liveness.refresh()
        state = SimpleNamespace(liveness=liveness, hub=hub, draining=False)
        try:
            up = (await health(state)).status_code  # type: ignore[arg-type]
            connected = int(r.info("clients")["connected_clients"])
            r.config_set("maxclients", connected - 1)  # the hub's place, once it lets go
            r.client_kill_filter(_type="pubsub")
            await asyncio.sleep(0.3)
            return up, (await health(state)).status_code  # type: ignore[arg-type]
        finally:
            r.config_set("maxclients", 10000)
            await hub.stop()
            await client.aclose()

    assert asyncio.run(main()) == (200, 503)
