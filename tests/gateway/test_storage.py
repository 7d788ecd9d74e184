"""The Redis file store (`gateway.storage`) on a bare Valkey: a listing is newest first,
pages with `after`, filters by purpose and by owner, and reads more files than fit in one
of its own pages."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from common.batch import FileObject
from corral.redis_server import EmbeddedRedis
from gateway.storage import _PAGE, RedisFileStore


def test_listing_filters_by_owner_and_purpose_across_pages(
    r: redis.Redis, own_redis: EmbeddedRedis
) -> None:
    n = 2 * _PAGE + 50

    async def run() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        store = RedisFileStore(client)
        made: list[FileObject] = []
        try:
            for i in range(n):  # newest last; owners alternate, every third is an output
                meta = FileObject(bytes=1, filename=f"f{i}", created_at=1000 + i,
                                  purpose="batch_output" if i % 3 == 0 else "batch",
                                  owner="key_a" if i % 2 else None)  # fmt: skip
                made.append(await store.put(meta, "x\n"))
            newest_first = [m.id for m in reversed(made)]
            everyone = await store.list(None, n + 10, None)
            assert [m.id for m in everyone] == newest_first
            mine = await store.list(None, n, None, viewer="key_a")
            assert [m.id for m in mine] == [m.id for m in reversed(made) if m.owner == "key_a"]
            assert {m.owner for m in mine} == {"key_a"}
            inputs = await store.list("batch", 3, None, viewer="key_a")
            wanted = [m.id for m in reversed(made) if m.owner == "key_a" and m.purpose == "batch"]
            assert [m.id for m in inputs] == wanted[:3]
            after = await store.list("batch", 3, inputs[-1].id, viewer="key_a")
            assert [m.id for m in after] == wanted[3:6]
            assert await store.list(None, 10, None, viewer="key_nobody") == []
            await store.delete(made[-1].id)
            assert (await store.list(None, 1, None))[0].id == made[-2].id
        finally:
            await client.aclose()

    asyncio.run(run())
