"""gateway.aio: stopping a task that swallowed its cancel (as Python 3.11's wait_for, used
by redis-py for every socket write, can do)."""

from __future__ import annotations

import asyncio

from gateway.aio import cancel_and_wait


def test_a_swallowed_cancel_is_repeated_until_the_task_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed += 1  # carries on, as if the cancel had not come
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task), 5)
        assert task.cancelled()

    asyncio.run(main())
    assert swallowed == 1


def test_a_task_that_already_ended_keeps_its_outcome() -> None:
    async def main() -> None:
        task = asyncio.create_task(asyncio.sleep(0, result=7))
        await task
        await cancel_and_wait(task)
        assert task.result() == 7

    asyncio.run(main())
