"""The gateway's pub/sub connection on a real Valkey, under both event loops the gateway
may run on (uvloop is what uvicorn picks): messages and pattern messages reach the
callback whole and in order; a connection Redis drops, or one that stops answering, ends
`run` with `ConnectionError` (the stream hub then fails its streams and reconnects); a
password in the URL is used, and a wrong one is refused."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import uvloop
from redis.exceptions import ResponseError

from corral.redis_server import EmbeddedRedis
from gateway.streaming import pubsub
from gateway.streaming.pubsub import PubSubConnection

Run = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    if request.param == "uvloop":
        return lambda main: uvloop.run(main())
    return lambda main: asyncio.run(main())


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_messages_reach_the_callback_in_order(
    own_redis: EmbeddedRedis, r: redis.Redis, run: Run
) -> None:
    got: list[tuple[bytes, bytes]] = []
    big = b"x" * 100_000  # arrives in several reads

    async def main() -> None:
        conn = await PubSubConnection.open(own_redis.url, lambda c, d: got.append((c, d)))
        try:
            await conn.psubscribe("chan:gw1:*")
            await conn.subscribe("notes")
            for i in range(50):
                r.publish(f"chan:gw1:{i}", f"frame {i}")
            r.publish("chan:gw2:0", "not ours")
            r.publish("notes", "changed")
            r.publish("chan:gw1:big", big)
            await _until(lambda: len(got) == 52)
        finally:
            conn.close()

    run(main)
    assert got[:50] == [(f"chan:gw1:{i}".encode(), f"frame {i}".encode()) for i in range(50)]
    assert got[50:] == [(b"notes", b"changed"), (b"chan:gw1:big", big)]


def test_a_dropped_connection_ends_run(own_redis: EmbeddedRedis, r: redis.Redis, run: Run) -> None:
    async def main() -> None:
        conn = await PubSubConnection.open(own_redis.url, lambda c, d: None)
        await conn.psubscribe("chan:*")
        running = asyncio.create_task(conn.run())
        await asyncio.sleep(0.05)
        r.client_kill_filter(_type="pubsub")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(running, 5)

    run(main)


def test_a_silent_redis_is_noticed_by_ping(
    own_redis: EmbeddedRedis, r: redis.Redis, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pubsub, "PING_INTERVAL_S", 0.1)
    monkeypatch.setattr(pubsub, "PING_TIMEOUT_S", 0.3)
    pid = int(r.info("server")["process_id"])

    async def main() -> None:
        conn = await PubSubConnection.open(own_redis.url, lambda c, d: None)
        await conn.psubscribe("chan:*")
        running = asyncio.create_task(conn.run())
        await asyncio.sleep(0.3)  # pings answered meanwhile
        assert not running.done()
        os.kill(pid, signal.SIGSTOP)  # alive, connected, and mute: no FIN ever comes
        try:
            with pytest.raises(ConnectionError, match="PING"):
                await asyncio.wait_for(running, 5)
        finally:
            os.kill(pid, signal.SIGCONT)

    run(main)


@pytest.fixture
def password(r: redis.Redis) -> Iterator[str]:
    r.config_set("requirepass", "s3cret")
    yield "s3cret"
    with redis.Redis(port=r.connection_pool.connection_kwargs["port"], password="s3cret") as admin:
        admin.config_set("requirepass", "")


def test_the_urls_password_is_used(own_redis: EmbeddedRedis, password: str, run: Run) -> None:
    url = own_redis.url.replace("redis://", f"redis://:{password}@")
    wrong = own_redis.url.replace("redis://", "redis://:nope@")

    async def main() -> None:
        conn = await PubSubConnection.open(url, lambda c, d: None)
        await conn.psubscribe("chan:*")
        conn.close()
        with pytest.raises(ResponseError):
            await PubSubConnection.open(wrong, lambda c, d: None)

    run(main)
