"""The Redis stores behind the Files and Batch APIs (`gateway.batches.files`,
`gateway.batches.store`)
on a bare Valkey: a listing is newest first, pages with `after`, filters by owner (and
files by purpose), and the file store reads more files than fit in one of its own pages.
A user's listing reads its own index (`gateway.batches.owner_index`), which the gateway fills once
with what was made before those indexes existed."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchState, FileObject
from common.errors import InvalidRequest
from corral.redis_server import EmbeddedRedis
from gateway.batches import owner_index
from gateway.batches.files import _PAGE, RedisFileStore
from gateway.batches.store import BatchStore


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
                meta = FileObject(
                    bytes=1,
                    filename=f"f{i}",
                    created_at=1000 + i,
                    purpose="batch_output" if i % 3 == 0 else "batch",
                    owner="key_a" if i % 2 else None,
                )
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


def test_batches_list_newest_first_by_owner_with_a_cursor(
    r: redis.Redis, own_redis: EmbeddedRedis
) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        store = BatchStore(client, RedisFileStore(client))
        try:
            made = []
            for i in range(7):  # owners alternate: key_a, None, key_a, ...
                batch = Batch(
                    endpoint="/v1/chat/completions",
                    input_file_id=f"file-{i}",
                    created_at=1000 + i,
                    status=BatchState.COMPLETED,
                    owner=None if i % 2 else "key_a",
                )
                await store.save_new(batch)
                made.append(batch)
            page, more = await store.list(None, 3)
            assert [b.id for b in page] == [b.id for b in made[::-1][:3]] and more
            assert page[0].input_file_id == "file-6" and page[0].owner == "key_a"
            mine = [b.id for b in made[::-1] if b.owner == "key_a"]  # 6, 4, 2, 0
            first, more = await store.list(None, 2, viewer="key_a")
            assert [b.id for b in first] == mine[:2] and more
            rest, more = await store.list(first[-1].id, 2, viewer="key_a")
            assert [b.id for b in rest] == mine[2:] and not more
            with pytest.raises(InvalidRequest):  # another owner's id is no cursor for key_a
                await store.list(made[1].id, 2, viewer="key_a")
        finally:
            await client.aclose()

    asyncio.run(run())


def _batch(i: int, owner: str | None) -> Batch:
    return Batch(
        endpoint="/v1/chat/completions",
        input_file_id=f"file-{i}",
        created_at=1000 + i,
        status=BatchState.COMPLETED,
        owner=owner,
    )


def test_a_users_listing_reads_only_its_own_index(r: redis.Redis, own_redis: EmbeddedRedis) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        files = RedisFileStore(client)
        batches = BatchStore(client, files)
        try:
            mine = [
                await files.put(
                    FileObject(
                        bytes=1,
                        filename=f"m{i}",
                        created_at=2000 + i,
                        purpose="batch",
                        owner="key_a",
                    ),
                    "x\n",
                )
                for i in range(3)
            ]
            for i in range(3):
                await batches.save_new(_batch(i, "key_a"))
            # Thousands of ids in the global indexes, none with anything behind them: a
            # listing that walked them would have to step over all of them.
            r.zadd(redis_keys.FILES, {f"file-other-{i}": 5000 + i for i in range(3000)})
            r.zadd(redis_keys.BATCHES, {f"batch_other_{i}": 5000 + i for i in range(3000)})
            assert [m.id for m in await files.list(None, 2, None, viewer="key_a")] == [
                mine[2].id,
                mine[1].id,
            ]
            page, more = await batches.list(None, 2, viewer="key_a")
            assert [b.input_file_id for b in page] == ["file-2", "file-1"] and more
            r.delete(
                redis_keys.FILES, redis_keys.BATCHES
            )  # the admin's indexes: not read for key_a
            assert len(await files.list(None, 10, None, viewer="key_a")) == 3
            assert len((await batches.list(None, 10, viewer="key_a"))[0]) == 3
            await files.delete(mine[0].id)
            assert r.zscore(redis_keys.files_of("key_a"), mine[0].id) is None
            assert len(await files.list(None, 10, None, viewer="key_a")) == 2
        finally:
            await client.aclose()

    asyncio.run(run())


def test_backfill_indexes_older_objects_by_owner_once(
    r: redis.Redis, own_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owner_index, "CHUNK", 3)  # several chunks from a few objects

    async def run() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        files = RedisFileStore(client)
        batches = BatchStore(client, files)
        try:
            for i in range(8):  # owners alternate: key_a, None, key_a, ...
                owner = None if i % 2 else "key_a"
                await files.put(
                    FileObject(
                        bytes=1, filename=f"f{i}", created_at=1000 + i, purpose="batch", owner=owner
                    ),
                    "x\n",
                )
                await batches.save_new(_batch(i, owner))
            expect_files = [m.id for m in await files.list(None, 10, None, viewer="key_a")]
            expect_batches = [b.id for b in (await batches.list(None, 10, viewer="key_a"))[0]]
            assert len(expect_files) == len(expect_batches) == 4
            # As the previous release left them: owners recorded, no per-owner index.
            r.delete(redis_keys.files_of("key_a"), redis_keys.batches_of("key_a"))
            assert await files.list(None, 10, None, viewer="key_a") == []

            await owner_index.backfill_once(client, [files, batches])
            assert [m.id for m in await files.list(None, 10, None, viewer="key_a")] == (
                expect_files
            )
            page, _ = await batches.list(None, 10, viewer="key_a")
            assert [b.id for b in page] == expect_batches  # newest first: the scores kept
            assert r.exists(redis_keys.OWNER_INDEXES)

            r.delete(redis_keys.files_of("key_a"))
            await owner_index.backfill_once(client, [files, batches])  # done once: no-op
            assert not r.exists(redis_keys.files_of("key_a"))
        finally:
            await client.aclose()

    asyncio.run(run())
