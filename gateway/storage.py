"""Where files live (batch inputs and outputs): a small interface, so an object store can
stand in for Redis without touching the API or the batch logic. Every gateway reaches the
same store; no gateway keeps a file on its own disk."""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis

from common import keys
from common.batch import FileObject

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
        pipe.set(keys.file_content_key(meta.id), content)
        pipe.set(keys.file_key(meta.id), meta.model_dump_json())
        if meta.owner is not None:
            pipe.hset(keys.FILE_OWNERS, meta.id, meta.owner)
        pipe.zadd(keys.FILES, {meta.id: meta.created_at})
        await pipe.execute()
        return meta

    async def get(self, file_id: str) -> FileObject | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(keys.file_key(file_id))
        pipe.hget(keys.FILE_OWNERS, file_id)
        return _loaded(*await pipe.execute())

    async def content(self, file_id: str) -> str | None:
        raw = await self._redis.get(keys.file_content_key(file_id))
        return None if raw is None else str(raw)

    async def delete(self, file_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(keys.file_key(file_id), keys.file_content_key(file_id))
        pipe.hdel(keys.FILE_OWNERS, file_id)
        pipe.zrem(keys.FILES, file_id)
        deleted, *_ = await pipe.execute()
        return bool(deleted)

    async def list(
        self, purpose: str | None, limit: int, after: str | None, viewer: str | None = None
    ) -> list[FileObject]:
        """Newest first; `after` is the id of the last file of the previous page. Read a
        page of ids at a time (two round trips), not a round trip per file."""
        ids = [str(i) for i in await self._redis.zrevrange(keys.FILES, 0, -1)]
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        out: list[FileObject] = []
        for first in range(0, len(ids), _PAGE):
            page = ids[first : first + _PAGE]
            owners = await self._redis.hmget(keys.FILE_OWNERS, page)
            mine = [(i, o) for i, o in zip(page, owners, strict=True) if viewer in (None, o)]
            if not mine:
                continue
            raws = await self._redis.mget([keys.file_key(i) for i, _ in mine])
            for (_, owner), raw in zip(mine, raws, strict=True):
                meta = _loaded(raw, owner)  # None: deleted meanwhile
                if meta is not None and purpose in (None, meta.purpose):
                    out.append(meta)
                    if len(out) >= limit:
                        return out
        return out


def _loaded(raw: bytes | str | None, owner: bytes | str | None) -> FileObject | None:
    """A file's metadata as stored, with its owner from the owners hash."""
    if not raw:
        return None
    meta = FileObject.model_validate_json(raw)
    meta.owner = None if owner is None else keys.text(owner)
    return meta
