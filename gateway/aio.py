"""asyncio helpers for the gateway's own tasks."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

RECANCEL_S = 0.1

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, however it ends.

    On Python 3.11, `asyncio.wait_for` swallows a cancel that arrives just as the operation
    it awaits completes (fixed in 3.12), and redis-py wraps every socket write in it. A task
    cancelled in the middle of a Redis command can therefore carry on as if nothing had
    happened, and `task.cancel(); await task` then waits forever (it hung the gateway's
    shutdown). So the cancel is repeated until the task is done. Nothing is raised: the
    caller reads the task's outcome if it cares."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)


class Shared(Generic[K, V]):
    """Concurrent calls for one key share one read: the first caller starts it, the others
    (while it runs) wait for its result instead of starting their own. A burst of requests
    that all find a cached value stale then costs one Redis read, not one each. The read
    runs as a task of its own, so a caller that is cancelled never cancels it for the
    others; its error, if any, is raised to every caller waiting."""

    def __init__(self, read: Callable[[K], Coroutine[Any, Any, V]]) -> None:
        self._read = read
        self._running: dict[K, asyncio.Task[V]] = {}

    async def __call__(self, key: K) -> V:
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._read(key))
            self._running[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it
