"""What `GET /health` says about Redis and the workers, read in the background.

`/health` answers from the event loop alone, with no Redis round trip: a load balancer's
check must not wait behind a burst of requests for a pooled connection and a reply. A
background task reads the live workers (`gateway.cluster.read_workers`) every `REFRESH_S`
on a connection of its own, and the route reports the last reading. Redis counts as away
when the last read failed, or when no read has succeeded for `STALE_S` (a Redis that stopped
answering, or a refresh that cannot run): the route then answers 503, as it did when it
read Redis itself. The worker counts are at most `REFRESH_S` old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.redis_conn import RedisTarget
from common.registry import WorkerState
from gateway.aio import cancel_and_wait
from gateway.cluster import read_workers

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # between two reads of the workers
STALE_S = 5.0  # no successful read for this long: Redis is away
SOCKET_TIMEOUT_S = 2.0  # a read that hangs fails after this (a paused Redis, say)


@dataclass(frozen=True)
class Reading:
    """One read of Redis: the live workers' counts, or why it failed."""

    at: float  # time.monotonic() when it was taken
    error: str | None = None
    workers: int = 0
    ready_workers: int = 0


class Liveness:
    """The last reading, refreshed by `run()`; `current()` never waits."""

    @classmethod
    def of(cls, target: RedisTarget) -> Liveness:
        """On a connection of its own, whose reads fail after `SOCKET_TIMEOUT_S`."""
        client = target.async_client(
            max_connections=1,
            timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            decode_responses=True,
        )
        return cls(client)

    def __init__(self, client: aioredis.Redis, owns_client: bool = True) -> None:
        self._client = client
        self._owns = owns_client
        self._last = Reading(time.monotonic(), error="not read yet")
        self._last_ok = float("-inf")
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> Reading:
        now = time.monotonic()
        try:
            alive = await read_workers(self._client)
        except (RedisError, OSError) as exc:
            reading = Reading(now, error=repr(exc))
        else:
            ready = sum(w.state is WorkerState.READY for w in alive)
            reading = Reading(now, workers=len(alive), ready_workers=ready)
            self._last_ok = now
        self._last = reading
        return reading

    def current(self) -> Reading:
        """The last reading; an error one if no read has succeeded for `STALE_S`."""
        age = time.monotonic() - self._last_ok
        if self._last.error is None and age > STALE_S:
            return Reading(self._last.at, error=f"no answer from Redis for {age:.1f} s")
        return self._last

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="corral-liveness")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug: the readings go stale, and /health says so
                log.exception("health: reading the workers failed")
            await asyncio.sleep(REFRESH_S)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._owns:
            await self._client.aclose(close_connection_pool=True)
