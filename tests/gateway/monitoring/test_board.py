"""The status page's feed (`gateway.monitoring.board.Board`) on a real Valkey, with the
cluster read stubbed: one read per tick for every watcher, nothing sent twice, model events
relayed at once and followed by a fresh read, Redis trouble reported then recovered from,
and no reading once nobody watches. Then `overview.for_caller`: what a user key sees."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from common import redis_keys
from common.apikeys import issue
from common.registry import ModelEvent, ModelState
from corral.redis_server import EmbeddedRedis
from gateway.monitoring.board import Board
from gateway.monitoring.model_events import StatusFeed
from gateway.monitoring.overview import for_caller
from gateway.tenancy.ownership import EVERYONE, Caller


class Reads:
    """A stand-in for the cluster read: returns `value`, or raises `fail` if set."""

    def __init__(self) -> None:
        self.count = 0
        self.value: dict[str, Any] = {"models": {}, "now": 0}
        self.fail: Exception | None = None

    async def __call__(self) -> dict[str, Any]:
        self.count += 1
        if self.fail is not None:
            raise self.fail
        return {**self.value, "now": self.count}  # `now` alone changes: not news


async def next_item(queue: asyncio.Queue[Any], timeout: float = 3) -> Any:
    async with asyncio.timeout(timeout):
        return await queue.get()


def test_watchers_share_reads_and_hear_only_news(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url)
        feed, reads = StatusFeed(client), Reads()
        board = Board(feed, reads, tick=0.05)
        try:
            a = await board.watch()
            assert (await next_item(a))[0] == "cluster"
            b = await board.watch()  # the latest snapshot at once
            assert (await next_item(b))[0] == "cluster"
            await asyncio.sleep(0.3)
            assert a.empty() and b.empty() and reads.count >= 4  # read each tick, unchanged

            reads.value = {"models": {"m": {}}}
            assert (await next_item(a))[1]["models"] == {"m": {}}
            assert (await next_item(b))[1]["models"] == {"m": {}}

            event = ModelEvent(model="m", worker="w", state=ModelState.OFF)
            r.publish(redis_keys.EVENTS, event.model_dump_json())
            assert await next_item(a) == ("model_update", event)

            reads.fail = RedisConnectionError("gone")
            kind, why = await next_item(a)
            assert kind == "error" and why["code"] == "redis_unavailable"
            reads.fail = None
            assert (await next_item(a))[0] == "cluster"  # back once Redis answers

            board.leave(a)
            board.leave(b)
            await asyncio.sleep(0.2)
            stopped = reads.count
            await asyncio.sleep(0.2)
            assert reads.count == stopped  # nobody watches: no reads
        finally:
            await board.stop()
            await feed.stop()
            await client.aclose()

    asyncio.run(main())


def test_a_user_key_sees_its_models_requests_and_batches_only() -> None:
    key, _ = issue("team-a", models=["a"])
    snapshot = {
        "models": {"a": {"status": "ready"}, "b": {"status": "off"}},
        "summary": {},
        "workers": [{"worker": "w1", "model": "a"}, {"worker": "w2", "model": "b"}],
        "queues": {"a": {}, "b": {}},
        "requests": [
            {"request_id": "mine", "owner": key.id},
            {"request_id": "theirs", "owner": "other"},
        ],
        "batches": [{"id": "b1", "owner": "other"}, {"id": "b2", "owner": key.id}],
    }
    seen = for_caller(snapshot, Caller(key))
    assert list(seen["models"]) == ["a"] and seen["summary"]["total"] == 1
    assert [w["worker"] for w in seen["workers"]] == ["w1"] and list(seen["queues"]) == ["a"]
    assert seen["requests"] == [{"request_id": "mine"}]  # and no owner's key id shown
    assert seen["batches"] == [{"id": "b2"}]
    everything = for_caller(snapshot, EVERYONE)
    assert len(everything["requests"]) == 2 and "owner" not in everything["requests"][0]
