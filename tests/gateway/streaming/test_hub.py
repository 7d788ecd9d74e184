"""The gateway's stream hub (`gateway.streaming.hub.StreamHub`) on a real Valkey, across a lost
pub/sub connection: a request that opens its subscription while the hub reconnects waits
for the new subscription, so a worker's frames reach it (they used to reach nobody, and the
request waited for its deadline); when Redis stays away, the request gets a 503. And a
subscription's sequence across a task that began again. And the queued requests the broker
lost (no record once it is back) are queued again after the reconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
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


def test_queued_requests_the_broker_lost_are_queued_again_after_a_reconnect(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    """A failover or a restart can lose an enqueue Redis acknowledged: after the pub/sub
    connection comes back, a queued request whose record is gone is queued again; one whose
    record is there, or that a worker started, is left alone."""
    requeued: list[str] = []

    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url)
        hub = StreamHub(client, "gw-hub", RedisTarget(own_redis.url))
        await hub.start()
        subs = {rid: await hub.open(rid, time.time() + 10) for rid in ("kept", "lost", "ran")}
        try:
            for rid, sub in subs.items():

                async def requeue(rid: str = rid) -> None:
                    requeued.append(rid)

                hub.enqueued(sub, requeue)
            r.hset(redis_keys.request_key("kept"), "state", "queued")
            subs["ran"].worker = "w"  # started: its frames, not its record, tell
            await asyncio.sleep(0.1)
            assert requeued == []  # nothing is looked up while the connection holds
            assert r.client_kill_filter(_type="pubsub") == 1
            assert await _until(lambda: bool(requeued), 5)
            await asyncio.sleep(0.2)  # nothing more comes
        finally:
            for sub in subs.values():
                sub.close()
            await hub.stop()
            await client.aclose()

    asyncio.run(main())
    assert requeued == ["lost"]


def test_a_request_enqueued_across_a_reconnect_is_looked_up_itself(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    """Opened before the connection broke, enqueued after the reconnect's look (its
    enqueue was under way): `enqueued` looks it up on its own."""
    requeued: list[str] = []

    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url)
        hub = StreamHub(client, "gw-hub", RedisTarget(own_redis.url))
        await hub.start()
        sub = await hub.open("late", time.time() + 10)
        try:
            assert r.client_kill_filter(_type="pubsub") == 1
            assert await _until(lambda: hub.incidents == 1 and hub.ready, 5)

            async def requeue() -> None:
                requeued.append("late")

            hub.enqueued(sub, requeue)
            assert await _until(lambda: bool(requeued), 5)
        finally:
            sub.close()
            await hub.stop()
            await client.aclose()

    asyncio.run(main())
    assert requeued == ["late"]


async def _until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
