"""The status page's live feed: one producer per gateway process, running only while some
page watches, that reads the cluster (`gateway.monitoring.overview`) once a tick, and again
soon after each model event, and hands every watcher the same result. A hundred open pages
cost the gateway one read a tick, not a hundred; a snapshot equal to the last one is not
sent again.

Each watcher's queue gets, in order: `("model_update", ModelEvent)` as the workers publish
them (`gateway.monitoring.model_events`), `("cluster", snapshot)`, and `("error", why)`
when Redis cannot be read (the producer retries every tick and sends a snapshot again once
it can). A watcher too far behind is dropped: its queue gets None and its stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from common.registry import ModelEvent
from gateway.aio import cancel_and_wait
from gateway.monitoring.model_events import LISTENER_BUFFER, StatusFeed, offer

log = logging.getLogger(__name__)

TICK_S = 1.0  # how often the cluster is read while someone watches
SETTLE_S = 0.1  # after a model event, how long to gather more before reading again

Item = tuple[str, Any] | None
Watcher = asyncio.Queue[Item]
Events = asyncio.Queue[ModelEvent | None]


class Board:
    def __init__(
        self,
        feed: StatusFeed,
        read: Callable[[], Awaitable[dict[str, Any]]],
        tick: float = TICK_S,
    ) -> None:
        self._feed = feed
        self._read = read
        self._tick = tick
        self._watchers: set[Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._last: Item = None  # the latest snapshot or error, for a new watcher
        self._starting = asyncio.Lock()

    async def watch(self) -> Watcher:
        """A queue of items from now on, the latest snapshot first if there is one;
        `leave()` when done. Model events are subscribed to before it returns."""
        watcher: Watcher = asyncio.Queue(LISTENER_BUFFER)
        async with self._starting:  # one producer, however many pages open at once
            if self._task is None or self._task.done():
                events = await self._feed.listen()  # before any snapshot: no event missed
                self._last = None
                self._task = asyncio.create_task(self._run(events), name="corral-board")
            elif self._last is not None:
                watcher.put_nowait(self._last)
            self._watchers.add(watcher)
        return watcher

    def leave(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        for watcher in list(self._watchers):
            self._offer(watcher, None)

    async def _run(self, events: Events | None) -> None:
        try:
            while True:
                await self._publish_snapshot()
                events = await self._wait(events)
                if not self._watchers:  # no await between this check and the task's end
                    return
        finally:
            if events is not None:
                self._feed.leave(events)

    async def _publish_snapshot(self) -> None:
        try:
            snapshot = await self._read()
        except RedisError as exc:
            log.warning("status board: cannot read Redis: %r", exc)
            item: Item = ("error", {"code": "redis_unavailable", "message": str(exc)})
        else:
            item = ("cluster", snapshot)
        if _same(item, self._last):
            return
        self._last = item
        self._fan_out(item)

    async def _wait(self, events: Events | None) -> Events | None:
        """Until the next tick, relaying model events; a little after the first one, return
        early so the snapshot shows it. Returns the event feed, re-opened if it had ended
        (None: it could not be, yet)."""
        deadline = time.monotonic() + self._tick
        if events is None:
            with contextlib.suppress(RedisError, TimeoutError):
                async with asyncio.timeout(self._tick):
                    events = await self._feed.listen()
        while events is not None and (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    event = await events.get()
            except TimeoutError:
                break
            if event is None:  # Redis went away: listen again next time
                self._feed.leave(events)
                events = None
                break
            self._fan_out(("model_update", event))
            deadline = min(deadline, time.monotonic() + SETTLE_S)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return events

    def _fan_out(self, item: Item) -> None:
        for watcher in list(self._watchers):
            self._offer(watcher, item)

    def _offer(self, watcher: Watcher, item: Item) -> None:
        offer(self._watchers, watcher, item)


def _same(a: Item, b: Item) -> bool:
    """Equal but for the time it was read."""
    if a is None or b is None or a[0] != b[0]:
        return False
    if a[0] != "cluster":
        return bool(a == b)
    return {**a[1], "now": None} == {**b[1], "now": None}
