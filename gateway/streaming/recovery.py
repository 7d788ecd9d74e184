"""Requests the broker lost, queued again once it is back.

An enqueue is one script on the master (record, task message, live count together), and
Redis acknowledges it before a replica or the append-only file has it. A Sentinel
failover, or a restart that loses the last second of writes, can therefore lose a request
its client was told nothing about: no worker will ever take it, and the client waits for
its deadline. After the hub's pub/sub connection comes back (`StreamHub`), this gateway's
requests that no worker has started are looked up; one whose record is gone was lost with
the broker and is queued again (its claim still lets it run at most once more: a copy that
survived somewhere is refused by the worker that finds it claimed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_keys
from common.errors import CorralError
from gateway.aio import cancel_and_wait

log = logging.getLogger(__name__)

BATCH = 500  # records looked up per round trip
TRIES = 5  # to look, 1 s, 2 s, ... apart while Redis is still settling

Requeue = Callable[[], Awaitable[None]]


class Queued(Protocol):
    """What recovery needs of a waiting request (`gateway.streaming.hub.Subscription`)."""

    request_id: str
    worker: str | None
    finished: bool
    requeue: Requeue | None


def waiting(subs: Sequence[Queued]) -> list[Queued]:
    """The requests still queued as far as this gateway knows, that can be queued again."""
    return [s for s in subs if s.worker is None and not s.finished and s.requeue is not None]


async def requeue_lost(client: aioredis.Redis, subs: Sequence[Queued]) -> int:
    """Queue again each of `subs` whose record the broker no longer has; how many."""
    lost = 0
    todo = waiting(subs)
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        pipe = client.pipeline(transaction=False)
        for sub in batch:
            pipe.exists(redis_keys.request_key(sub.request_id))
        found = await pipe.execute()
        for sub, there in zip(batch, found, strict=True):
            if there or sub.worker is not None or sub.requeue is None:
                continue  # present, or started meanwhile
            log.warning(
                "job=%s lost by the broker (no record after it came back): queued again",
                sub.request_id,
            )
            await sub.requeue()
            lost += 1
    return lost


class LostRequests:
    """The hub's checks for lost requests, each in the background (the hub reads on)."""

    def __init__(self, client: aioredis.Redis, gateway_id: str) -> None:
        self._redis = client
        self._gateway_id = gateway_id
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self, subs: Sequence[Queued]) -> None:
        """Queue again those of `subs` the broker lost."""
        task = asyncio.create_task(self._run(list(subs)), name="corral-requeue-lost")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)

    async def _run(self, subs: list[Queued]) -> None:
        for attempt in range(1, TRIES + 1):
            try:
                lost = await requeue_lost(self._redis, subs)
            except (RedisError, OSError, CorralError) as exc:
                log.warning("gateway=%s cannot look for lost requests: %r", self._gateway_id, exc)
                await asyncio.sleep(attempt)
                continue
            if lost:
                log.warning("gateway=%s queued %d lost request(s) again", self._gateway_id, lost)
            return
