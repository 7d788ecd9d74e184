"""asyncio helpers for the gateway's own tasks."""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_S = 0.1


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
