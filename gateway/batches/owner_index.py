"""Per-owner indexes of files and batches (`redis_keys.files_of`, `redis_keys.batches_of`).

A user key's listing reads its own ids, one page at a time, by rank in its own sorted set:
its cost does not grow with what other tenants made. The global indexes (`redis_keys.FILES`,
`redis_keys.BATCHES`) stay, for the admin key's listing. Objects made before the per-owner
indexes existed are copied into them once per Redis (`backfill_once`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, cast

import redis.asyncio as aioredis

from common import redis_keys

log = logging.getLogger(__name__)

CHUNK = 500  # ids copied per round trip by the backfill

OwnersOf = Callable[[list[str]], Awaitable[Sequence[bytes | str | None]]]


class Indexed(Protocol):
    async def index_owners(self) -> int: ...


async def start_after(redis: aioredis.Redis, index: str, after: str) -> int | None:
    """The rank a page after `after` starts at; None if `after` is not in `index`."""
    rank = cast(int | None, await redis.zrevrank(index, after))
    return None if rank is None else rank + 1


async def page(redis: aioredis.Redis, index: str, start: int, count: int) -> list[str]:
    """Up to `count` ids from rank `start`, newest first."""
    ids = cast(list[bytes | str], await redis.zrevrange(index, start, start + count - 1))
    return [redis_keys.text(i) for i in ids]


async def backfill(
    redis: aioredis.Redis, index: str, owners_of: OwnersOf, index_of: Callable[[str], str]
) -> int:
    """Copy every id of the global `index` that has an owner into `index_of(owner)`, with
    its score (creation time). Idempotent (ZADD), so two gateways may run it together."""
    copied = start = 0
    while chunk := await _scored(redis, index, start):
        owners = await owners_of([redis_keys.text(item) for item, _ in chunk])
        pipe = redis.pipeline(transaction=False)
        for (item, score), owner in zip(chunk, owners, strict=True):
            if owner is not None:
                pipe.zadd(index_of(redis_keys.text(owner)), {redis_keys.text(item): score})
                copied += 1
        await pipe.execute()
        start += CHUNK
    return copied


async def _scored(redis: aioredis.Redis, index: str, start: int) -> list[tuple[bytes | str, float]]:
    """A chunk of the index in creation order, with the scores (creation times)."""
    chunk = await redis.zrange(index, start, start + CHUNK - 1, withscores=True)
    return cast(list[tuple[bytes | str, float]], chunk)


async def backfill_once(redis: aioredis.Redis, stores: Sequence[Indexed]) -> None:
    """Index by owner what the previous release made, unless done already on this Redis.
    The marker is set after the copy: a gateway that dies halfway leaves the next one to
    copy again (harmless), never an index with holes marked complete."""
    if await redis.exists(redis_keys.OWNER_INDEXES):
        return
    copied = [await store.index_owners() for store in stores]
    await redis.set(redis_keys.OWNER_INDEXES, "1")
    log.info("indexed by owner: %s objects made before the per-owner indexes", sum(copied))
