"""What a batch leaves (`gateway.batches.output`), on a bare Valkey: the output and error files
in input order, with a line for each item an expired batch never ran and the batch's owner;
and the once-only error line of an item lost with its workers too often."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchLine, BatchState
from corral.redis_server import EmbeddedRedis
from gateway.batches.files import RedisFileStore
from gateway.batches.output import record_lost, write_files
from gateway.batches.store import item_id


def line(custom_id: str) -> BatchLine:
    return BatchLine(
        custom_id=custom_id,
        method="POST",
        url="/v1/chat/completions",
        body={"model": "m", "messages": []},
    )


def result(custom_id: str, status: int) -> str:
    return json.dumps(
        {
            "id": f"batch_req_{custom_id}",
            "custom_id": custom_id,
            "response": {"status_code": status, "body": {}},
            "error": None,
        }
    )


def test_files_in_input_order_with_the_items_an_expired_batch_never_ran(
    r: redis.Redis, own_redis: EmbeddedRedis
) -> None:
    batch = Batch(endpoint="/v1/chat/completions", input_file_id="file-in", owner="key_a")
    lines = [line(c) for c in ("c", "a", "b", "d")]
    r.hset(
        redis_keys.batch_results_key(batch.id),
        mapping={
            "d": result("d", 200),
            "c": result("c", 400),
            "a": result("a", 200),
            "b": json.dumps({"custom_id": "b", "skipped": True}),  # cancelled before it ran
        },
    )
    r.hset(redis_keys.batch_results_key(batch.id), "e", result("e", 200))  # not in the input

    async def run() -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], set[str | None]]:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        files = RedisFileStore(client)
        try:
            fields = await write_files(
                client, files, batch, BatchState.EXPIRED, [*lines, line("late")]
            )
            contents = {}
            owners = set()
            for name, file_id in fields.items():
                text = await files.content(file_id)
                assert text is not None and text.endswith("\n")
                contents[name] = [json.loads(x) for x in text.splitlines()]
                meta = await files.get(file_id)
                assert meta is not None and meta.purpose == "batch_output"
                owners.add(meta.owner)
            return fields, contents, owners
        finally:
            await client.aclose()

    fields, contents, owners = asyncio.run(run())
    assert set(fields) == {"output_file_id", "error_file_id"}
    assert [x["custom_id"] for x in contents["output_file_id"]] == ["a", "d"]
    errors = contents["error_file_id"]
    assert [x["custom_id"] for x in errors] == ["c", "late"]
    assert errors[1]["id"] == f"batch_req_{item_id(batch.id, 4)}"
    assert errors[1]["error"]["code"] == "batch_expired"
    assert owners == {"key_a"}  # the results are the batch owner's


def test_a_lost_item_is_reported_once(r: redis.Redis, own_redis: EmbeddedRedis) -> None:
    r.hset(redis_keys.batch_key("batch_x"), mapping={"failed": 2, "status": "in_progress"})
    r.hset(redis_keys.batch_key("batch_y"), mapping={"failed": 0, "status": "finalizing"})

    async def run() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        try:
            for _ in range(2):  # a second supervisor round writes nothing more
                await record_lost(client, "batch_x", "batch_x-7", "item-7", 3)
            # one being finalized takes no more results: they would be in no file
            await record_lost(client, "batch_y", "batch_y-1", "item-1", 3)
        finally:
            await client.aclose()

    asyncio.run(run())
    reported = json.loads(r.hget(redis_keys.batch_results_key("batch_x"), "item-7") or "{}")
    assert reported["error"]["code"] == "worker_lost" and "3 times" in reported["error"]["message"]
    assert reported["id"] == "batch_req_batch_x-7" and reported["response"] is None
    assert r.hget(redis_keys.batch_key("batch_x"), "failed") == "3"
    assert not r.exists(redis_keys.batch_results_key("batch_y"))
    assert r.hget(redis_keys.batch_key("batch_y"), "failed") == "0"
