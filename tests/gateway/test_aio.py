"""gateway.aio: stopping a task that swallowed its cancel (as Python 3.11's wait_for, used
by redis-py for every socket write, can do); concurrent reads of one key sharing one call."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import Shared, cancel_and_wait


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


def test_concurrent_reads_of_a_key_share_one_call_and_its_error() -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    async def read(key: str) -> str:
        calls.append(key)
        await gate.wait()
        if key == "bad":
            raise ValueError("no such thing")
        return key.upper()

    async def main() -> tuple[list[object], str]:
        shared = Shared(read)
        waiting = [asyncio.create_task(shared(k)) for k in ("a", "a", "a", "b", "bad", "bad")]
        await asyncio.sleep(0.01)
        waiting[0].cancel()  # one caller leaves: the read goes on for the others
        gate.set()
        got: list[object] = list(await asyncio.gather(*waiting, return_exceptions=True))
        return got, await shared("a")  # the read ended: a later call reads again

    got, again = asyncio.run(main())
    assert isinstance(got[0], asyncio.CancelledError)
    assert got[1:4] == ["A", "A", "B"]
    assert all(isinstance(g, ValueError) for g in got[4:])
    assert (calls, again) == (["a", "b", "bad", "a"], "A")


def test_a_shared_read_is_not_cancelled_with_its_first_caller() -> None:
    async def main() -> str:
        gate = asyncio.Event()

        async def read(_: None) -> str:
            await gate.wait()
            return "done"

        shared = Shared(read)
        first = asyncio.create_task(shared(None))
        await asyncio.sleep(0)
        second = asyncio.create_task(shared(None))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        return await asyncio.wait_for(second, 2)

    assert asyncio.run(main()) == "done"
