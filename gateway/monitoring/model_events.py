"""`GET /v1/models/status/stream`'s source: the workers' `ModelEvent`s on `redis_keys.EVENTS`.

One pub/sub subscription per gateway process, opened when the first client listens and
fanned out to every listener's queue (like `gateway.streaming.hub` does for request frames), so a
dashboard per operator costs no Redis connection each. Workers publish each transition as
it happens, so a load that takes 100 ms still shows `loading` then `ready`, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import redis_keys
from common.registry import ModelEvent
from gateway.aio import cancel_and_wait

log = logging.getLogger(__name__)

LISTENER_BUFFER = 1000  # events a slow listener may lag behind before it is dropped


class StatusFeed:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._listeners: set[asyncio.Queue[ModelEvent | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def listen(self) -> asyncio.Queue[ModelEvent | None]:
        """A queue of events from now on (None: the feed ended); `leave()` when done."""
        queue: asyncio.Queue[ModelEvent | None] = asyncio.Queue(LISTENER_BUFFER)
        self._listeners.add(queue)
        if self._task is None or self._task.done():
            self._subscribed.clear()
            self._task = asyncio.create_task(self._read(), name="corral-status-feed")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)
        return queue

    def leave(self, queue: asyncio.Queue[ModelEvent | None]) -> None:
        self._listeners.discard(queue)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        for queue in list(self._listeners):
            self._offer(queue, None)

    async def _read(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(redis_keys.EVENTS)
            self._subscribed.set()
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                try:
                    event = ModelEvent.model_validate_json(message["data"])
                except ValueError:
                    continue
                for queue in list(self._listeners):
                    self._offer(queue, event)
        except RedisError as exc:
            log.warning("status feed: lost Redis: %r", exc)
            for queue in list(self._listeners):
                self._offer(queue, None)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _offer(self, queue: asyncio.Queue[ModelEvent | None], item: ModelEvent | None) -> None:
        offer(self._listeners, queue, item)


T = TypeVar("T")


def offer(
    listeners: set[asyncio.Queue[T | None]], queue: asyncio.Queue[T | None], item: T | None
) -> None:
    """Give `item` to one of `listeners`. A listener this far behind is dropped, not waited
    for, and told so (None): its stream ends, its client reconnects for a fresh
    `full_status` rather than hear no more."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        listeners.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
