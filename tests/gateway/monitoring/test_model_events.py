"""The gateway's model-status feed (`gateway.monitoring.model_events.StatusFeed`) on a real
Valkey: a
listener that falls too far behind is told its feed ended, so its SSE stream closes and
its client reconnects for a fresh `full_status` (it used to hear nothing more, forever,
but heartbeats)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.registry import ModelEvent, ModelState
from corral.redis_server import EmbeddedRedis
from gateway.monitoring import model_events
from gateway.monitoring.model_events import StatusFeed


def test_a_listener_too_far_behind_is_told_it_was_dropped(
    own_redis: EmbeddedRedis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_events, "LISTENER_BUFFER", 2)

    async def main() -> list[ModelEvent | None]:
        client = aioredis.Redis.from_url(own_redis.url)
        feed = StatusFeed(client)
        try:
            events = await feed.listen()
            for n in range(5):  # it reads none of them meanwhile
                event = ModelEvent(model=f"m{n}", worker="w", state=ModelState.READY)
                r.publish(redis_keys.EVENTS, event.model_dump_json())
            got: list[ModelEvent | None] = []
            async with asyncio.timeout(5):
                while not got or got[-1] is not None:
                    got.append(await events.get())
            return got
        finally:
            await feed.stop()
            await client.aclose()

    assert asyncio.run(main()) == [None]
