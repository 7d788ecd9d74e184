"""One gateway at a time for a cluster-wide duty (batch supervision, aging of low requests,
the affinity sweep).

Every gateway runs the duty's loop, but each round starts by holding a lock: a key
holding the gateway's id, with a short TTL the holder refreshes every round. A gateway
that dies stops refreshing and another takes over within the TTL. Taking and refreshing
are one script, so a lock that expires between a read and a refresh is never extended
on behalf of a gateway that no longer holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.locks import RELEASE_LUA

log = logging.getLogger(__name__)

# KEYS: the lock. ARGV: the holder's id, the TTL in ms. Returns 1 if the caller holds it.
HOLD_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class LeaderLock:
    """`key` held by `holder` for `ttl` seconds from each successful `hold`."""

    def __init__(self, client: aioredis.Redis, key: str, holder: str, ttl: float) -> None:
        self.key = key
        self.holder = holder
        self._ttl_ms = int(ttl * 1000)
        self._hold = client.register_script(HOLD_LUA)
        self._release = client.register_script(RELEASE_LUA)

    async def hold(self) -> bool:
        """Take the lock if it is free, refresh it if it is ours; True if we hold it now."""
        return bool(await self._hold(keys=[self.key], args=[self.holder, self._ttl_ms]))

    async def release(self) -> None:
        """Let another gateway take over at once rather than after the TTL (a clean stop)."""
        await self._release(keys=[self.key], args=[self.holder])


async def lead_forever(
    lock: LeaderLock, duty: Callable[[], Awaitable[object]], interval: float, what: str
) -> None:
    """Every gateway runs this loop; only the lock's holder does `duty`, each `interval`
    seconds. A failed round is logged and the next one tries again."""
    while True:
        try:
            if await lock.hold():
                await duty()
        except asyncio.CancelledError:
            raise
        except RedisError as exc:  # the broker away: one line, the next round tries again
            log.warning("%s round failed: Redis unavailable: %r", what, exc)
        except Exception:
            log.exception("%s round failed", what)
        await asyncio.sleep(interval)


class LeaderDuty:
    """A cluster-wide duty every gateway runs and only the lock's holder performs.

    A subclass sets `name`, `interval` and `_leader` and defines `tick` (one round)."""

    name: str
    interval: float
    _leader: LeaderLock

    async def tick(self) -> object:
        raise NotImplementedError

    async def run(self) -> None:
        """Every gateway runs this; only the lock's holder does `tick`."""
        await lead_forever(self._leader, self.tick, self.interval, self.name)

    async def stop(self) -> None:
        """Hand the duty over at once (call after cancelling `run`)."""
        try:
            await self._leader.release()
        except RedisError as exc:  # it expires on its own within the lock's TTL
            log.warning("%s lock not released: %r", self.name, exc)
