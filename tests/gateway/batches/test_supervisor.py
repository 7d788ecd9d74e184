"""The batch supervisor (`gateway.batches.supervisor.BatchSupervisor.tick`) and the enqueue
(`gateway.batches.intake.BatchRunner`) on a bare Valkey: a batch
whose input file is gone ends failed instead of failing every round, and the batches after
it are still finalized; a batch whose items wait in its queue asks again, now and then,
for its model to be placed (the placer is a stand-in that counts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchState, FileObject, RequestCounts
from common.settings import ModelConfig, Settings
from corral.redis_server import EmbeddedRedis
from gateway.batches import supervisor as supervisor_module
from gateway.batches.files import RedisFileStore
from gateway.batches.intake import BatchRunner, Place
from gateway.batches.store import BatchStore
from gateway.batches.supervisor import BatchSupervisor
from gateway.catalog import Catalog
from gateway.queueing.dispatch import Dispatcher

LINE = {
    "custom_id": "c1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}
RESULT = {
    "id": "batch_req_1",
    "custom_id": "c1",
    "response": {"status_code": 200, "body": {}},
    "error": None,
}


@dataclass
class Parts:
    client: aioredis.Redis
    store: BatchStore
    runner: BatchRunner
    supervisor: BatchSupervisor


@contextlib.asynccontextmanager
async def _batches(url: str, place: Place | None = None) -> AsyncIterator[Parts]:
    """A gateway's batch side on `url`, serving one model "m"."""
    settings = Settings(models={"m": ModelConfig(model_path=Path("/models/m.gguf"))})
    client = aioredis.Redis.from_url(url, decode_responses=True)
    store = BatchStore(client, RedisFileStore(client))
    dispatcher = Dispatcher(settings, url, client)
    catalog = Catalog(settings, client)
    runner = BatchRunner(client, store, dispatcher, catalog, "gw-unit", place=place)
    try:
        yield Parts(
            client, store, runner, BatchSupervisor(client, runner, dispatcher, catalog, "gw-unit")
        )
    finally:
        dispatcher.close()
        await client.aclose()


def test_a_batch_without_its_input_fails_and_holds_up_no_other(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    async def main() -> tuple[Batch, Batch]:
        async with _batches(own_redis.url) as parts:
            client, store, supervisor = parts.client, parts.store, parts.supervisor
            meta = FileObject(bytes=1, filename="in.jsonl", purpose="batch")
            await store.files.put(meta, json.dumps(LINE) + "\n")
            done = RequestCounts(total=1, completed=1)
            lost = Batch(
                id="batch_0lost",
                endpoint="/v1/chat/completions",
                input_file_id="file-gone",
                status=BatchState.IN_PROGRESS,
                request_counts=done,
            )
            fine = Batch(
                id="batch_1fine",
                endpoint="/v1/chat/completions",
                input_file_id=meta.id,
                status=BatchState.IN_PROGRESS,
                request_counts=done,
            )
            for batch in (lost, fine):  # every item has its result: both are due to finish
                await store.save_new(batch)
                await client.hset(
                    redis_keys.batch_key(batch.id), mapping={"enqueued": 1, "completed": 1}
                )
                await client.hset(redis_keys.batch_results_key(batch.id), "c1", json.dumps(RESULT))
            await supervisor.tick()
            return await store.load(lost.id), await store.load(fine.id)

    lost, fine = asyncio.run(main())
    assert lost.status is BatchState.FAILED
    assert fine.status is BatchState.COMPLETED and fine.output_file_id
    assert r.smembers(redis_keys.BATCHES_ACTIVE) == set()


def test_an_ended_batch_left_active_is_let_go(own_redis: EmbeddedRedis, r: redis.Redis) -> None:
    """Its end was written but its removal from the active set was lost (a Redis blip, a
    gateway killed between the two): the next round lets it go rather than keep it, and
    its input file, forever."""

    async def main() -> None:
        async with _batches(own_redis.url) as parts:
            client, store, supervisor = parts.client, parts.store, parts.supervisor
            batch = Batch(
                endpoint="/v1/chat/completions",
                input_file_id="file-in",
                status=BatchState.COMPLETED,
            )
            await store.save_new(batch)
            await client.sadd(redis_keys.BATCHES_ACTIVE, batch.id)
            assert await store.active_using("file-in") == batch.id
            await supervisor.tick()
            assert await store.active_using("file-in") is None

    asyncio.run(main())
    assert r.smembers(redis_keys.BATCHES_ACTIVE) == set()


def test_queued_items_ask_again_for_their_model_to_be_placed(
    own_redis: EmbeddedRedis, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The placement at creation had to wait (say, another model was within its residency):
    the supervisor asks again every `PLACE_EVERY_S`, while items are left."""
    asked: list[str] = []

    async def place(model: str) -> None:
        asked.append(model)

    async def main() -> None:
        async with _batches(own_redis.url, place) as parts:
            client, store, supervisor = parts.client, parts.store, parts.supervisor
            meta = FileObject(bytes=1, filename="in.jsonl", purpose="batch")
            await store.files.put(meta, json.dumps(LINE) + "\n")
            batch = Batch(
                endpoint="/v1/chat/completions",
                input_file_id=meta.id,
                status=BatchState.IN_PROGRESS,
                request_counts=RequestCounts(total=1),
                expires_at=int(time.time()) + 3600,
            )
            await store.save_new(batch)
            await client.hset(redis_keys.batch_key(batch.id), "enqueued", 1)
            await client.lpush(redis_keys.batch_queue("m"), "an item nobody takes")
            await supervisor.tick()
            await supervisor.tick()  # within PLACE_EVERY_S: not again
            assert asked == ["m"]
            monkeypatch.setattr(supervisor_module, "PLACE_EVERY_S", 0.0)
            await supervisor.tick()
            assert asked == ["m", "m"]

    asyncio.run(main())


def test_an_enqueue_goes_on_from_what_was_enqueued_before_it(
    own_redis: EmbeddedRedis, r: redis.Redis
) -> None:
    """A second enqueue (the supervisor's, after the first one's lease ran out while its
    gateway stalled) starts from `enqueued` as it reads it once it holds the lease, not
    from the position it was given: no item goes out twice."""
    lines = [dict(LINE, custom_id=f"c{i}") for i in range(3)]

    async def main() -> None:
        async with _batches(own_redis.url) as parts:
            client, store, runner = parts.client, parts.store, parts.runner
            meta = FileObject(bytes=1, filename="in.jsonl", purpose="batch")
            await store.files.put(meta, "".join(json.dumps(x) + "\n" for x in lines))
            batch = Batch(
                endpoint="/v1/chat/completions",
                input_file_id=meta.id,
                status=BatchState.IN_PROGRESS,
                request_counts=RequestCounts(total=3),
            )
            await store.save_new(batch)
            parsed = await runner.lines(batch)
            await client.hset(redis_keys.batch_key(batch.id), "enqueued", 2)  # the first one's
            await runner._enqueue(batch, parsed, 0)  # given a stale start

    asyncio.run(main())
    assert r.llen(redis_keys.batch_queue("m")) == 1  # only the third item
