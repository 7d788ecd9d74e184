"""Where files live (batch inputs and outputs): a small interface, so an object store can
stand in for Redis without touching the API or the batch logic. Every gateway reaches the
same store; no gateway keeps a file on its own disk."""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis

from common import redis_keys
from common.batch import FileObject
from gateway.batches import owner_index

_PAGE = 200  # file ids read per round trip when listing


class FileStore(Protocol):
    """Files with their owner (`FileObject.owner`, the key that made them), which the API
    never shows. `viewer` limits a listing to one owner's files; None lists everyone's."""

    async def put(self, meta: FileObject, content: str) -> FileObject: ...
    async def get(self, file_id: str) -> FileObject | None: ...
    async def content(self, file_id: str) -> str | None: ...
    async def delete(self, file_id: str) -> bool: ...
    async def list(
        self, purpose: str | None, limit: int, after: str | None, viewer: str | None = None
    ) -> list[FileObject]: ...


class RedisFileStore:
    """Files as Redis strings (metadata JSON + content), indexed by creation time; owners in
    one hash beside them. The broker runs with `noeviction`, so a stored file is never
    dropped to make room."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client

    async def put(self, meta: FileObject, content: str) -> FileObject:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(redis_keys.file_content_key(meta.id), content)
        pipe.set(redis_keys.file_key(meta.id), meta.model_dump_json())
        if meta.owner is not None:
            pipe.hset(redis_keys.FILE_OWNERS, meta.id, meta.owner)
            pipe.zadd(redis_keys.files_of(meta.owner), {meta.id: meta.created_at})
        pipe.zadd(redis_keys.FILES, {meta.id: meta.created_at})
        await pipe.execute()
        return meta

    async def get(self, file_id: str) -> FileObject | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(redis_keys.file_key(file_id))
        pipe.hget(redis_keys.FILE_OWNERS, file_id)
        return _loaded(*await pipe.execute())

    async def content(self, file_id: str) -> str | None:
        raw = await self._redis.get(redis_keys.file_content_key(file_id))
        return None if raw is None else str(raw)

    async def delete(self, file_id: str) -> bool:
        owner = await self._redis.hget(redis_keys.FILE_OWNERS, file_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(redis_keys.file_key(file_id), redis_keys.file_content_key(file_id))
        pipe.hdel(redis_keys.FILE_OWNERS, file_id)
        pipe.zrem(redis_keys.FILES, file_id)
        if owner is not None:
            pipe.zrem(redis_keys.files_of(redis_keys.text(owner)), file_id)
        deleted, *_ = await pipe.execute()
        return bool(deleted)

    async def list(
        self, purpose: str | None, limit: int, after: str | None, viewer: str | None = None
    ) -> list[FileObject]:
        """Newest first; `after` is the id of the last file of the previous page (one not
        in the listing starts it from the newest). A user's listing reads its own index
        (`gateway.batches.owner_index`); each chunk of ids costs two more round trips."""
        index = redis_keys.FILES if viewer is None else redis_keys.files_of(viewer)
        start = 0
        if after is not None:
            start = await owner_index.start_after(self._redis, index, after) or 0
        chunk = min(limit, _PAGE) if purpose is None else _PAGE  # a filter may skip many
        out: list[FileObject] = []
        while ids := await owner_index.page(self._redis, index, start, chunk):
            start += len(ids)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(redis_keys.FILE_OWNERS, ids)
            pipe.mget([redis_keys.file_key(i) for i in ids])
            owners, raws = await pipe.execute()
            for owner, raw in zip(owners, raws, strict=True):
                meta = _loaded(raw, owner)  # None: deleted meanwhile
                if meta is None or viewer not in (None, meta.owner):
                    continue
                if purpose in (None, meta.purpose):
                    out.append(meta)
                    if len(out) >= limit:
                        return out
        return out

    async def index_owners(self) -> int:
        """Files made before the per-owner indexes, into them (`owner_index.backfill`)."""

        async def owners(ids: list[str]) -> list[bytes | str | None]:
            return await self._redis.hmget(redis_keys.FILE_OWNERS, ids)

        return await owner_index.backfill(
            self._redis, redis_keys.FILES, owners, redis_keys.files_of
        )


def _loaded(raw: bytes | str | None, owner: bytes | str | None) -> FileObject | None:
    """A file's metadata as stored, with its owner from the owners hash."""
    if not raw:
        return None
    meta = FileObject.model_validate_json(raw)
    meta.owner = None if owner is None else redis_keys.text(owner)
    return meta
