"""Cluster-wide duties (`gateway.leader.LeaderDuty`): every gateway runs one, only the lock's
holder does its rounds, and a gateway that stops hands the duty over at once, not after
the lock's TTL. On a bare Valkey."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from corral.redis_server import EmbeddedRedis
from gateway.aio import cancel_and_wait
from gateway.leader import LeaderDuty, LeaderLock


class Counting(LeaderDuty):
    name = "counting"

    def __init__(self, client: aioredis.Redis, holder: str) -> None:
        self.interval = 0.02
        self._leader = LeaderLock(client, "test:leader", holder, ttl=30)
        self.rounds = 0

    async def tick(self) -> None:
        self.rounds += 1


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return False


def test_one_gateway_does_the_rounds_and_hands_them_over_on_stop(own_redis: EmbeddedRedis) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        await client.delete("test:leader")
        a, b = Counting(client, "gw-a"), Counting(client, "gw-b")
        run_a = asyncio.create_task(a.run())
        assert await _until(lambda: a.rounds >= 3)
        run_b = asyncio.create_task(b.run())
        await asyncio.sleep(0.2)
        assert b.rounds == 0  # a holds the lock (30 s TTL)
        # as the gateway stops its duties: a lone cancel can be lost inside a Redis command
        # on Python 3.11 (`gateway.aio.cancel_and_wait`), and the test waited forever
        await cancel_and_wait(run_a)
        await a.stop()
        # b takes over well within the TTL because a released the lock
        assert await _until(lambda: b.rounds >= 3)
        await cancel_and_wait(run_b)
        await b.stop()
        assert await client.get("test:leader") is None
        await client.aclose()

    asyncio.run(main())
