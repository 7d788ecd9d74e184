"""The Batch API's records: create (validate the input file, enqueue every item at batch
priority), read, list, cancel. Creating and enqueueing is `gateway.batches.intake`; the
long-running side (resuming enqueues, finalizing, re-queueing items of dead workers,
expiry) is `gateway.batches.supervisor`.

A batch is a Redis hash: its static fields as one JSON value, plus `status`, counters and
timestamps as their own fields, so workers can `HINCRBY` counters and read `status`
without a read-modify-write.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchErrors, BatchLine, BatchState, LineError, RequestCounts
from common.errors import BatchNotFound, InvalidRequest
from common.jobs import Job, JobKind
from common.priority import Priority
from gateway.batches import owner_index
from gateway.batches.files import FileStore

log = logging.getLogger(__name__)

KINDS = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/completions": JobKind.COMPLETION,
    "/v1/embeddings": JobKind.EMBEDDING,
}
STATIC = (
    "id",
    "endpoint",
    "input_file_id",
    "completion_window",
    "created_at",
    "expires_at",
    "metadata",
    "errors",
)
WINDOWS = {"24h": 24 * 3600}

# Check and set in one step: a cancel read "in_progress" while the supervisor wrote
# "finalizing" and then the final status would otherwise overwrite it, and a batch already
# out of the active set would stay "cancelling" for good. Returns the status before.
CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'cancelling_at', ARGV[3])
end
return status
"""


# Check and set too: only one finalizer writes a batch's files, even when two gateways both
# believed they led (a round longer than the leader lock's TTL). A finalizer that died
# midway leaves "finalizing" behind: after STALE_FINALIZING_S another may start over.
# KEYS: the batch. ARGV: in progress, cancelling, finalizing, now, stale age. 1: go.
FINALIZE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
local since = tonumber(redis.call('HGET', KEYS[1], 'finalizing_at') or '0')
if status == ARGV[1] or status == ARGV[2]
   or (status == ARGV[3] and tonumber(ARGV[4]) - since > tonumber(ARGV[5])) then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finalizing_at', ARGV[4])
  return 1
end
return 0
"""
STALE_FINALIZING_S = 300


def item_id(batch_id: str, index: int) -> str:
    """The task id (and request id) of a batch's `index`-th item."""
    return f"{batch_id}-{index}"


def item_job(batch: Batch, index: int, line: BatchLine) -> Job:
    model = str(line.body["model"])
    return Job(
        request_id=item_id(batch.id, index),
        kind=KINDS[line.url],
        model=model,
        body=line.body,
        stream=False,
        priority=Priority.LOW,
        channel="",
        deadline=float(batch.expires_at or time.time() + WINDOWS["24h"]),
        batch_id=batch.id,
        custom_id=line.custom_id,
        owner=batch.owner,
    )


class BatchStore:
    def __init__(self, client: aioredis.Redis, files: FileStore) -> None:
        self._redis = client
        self.files = files
        self._cancel = client.register_script(CANCEL_LUA)
        self._finalize = client.register_script(FINALIZE_LUA)

    async def save_new(self, batch: Batch) -> None:
        static = batch.model_dump(mode="json", include=set(STATIC))
        fields: dict[Any, Any] = {
            "static": json.dumps(static),
            "status": batch.status.value,
            "total": batch.request_counts.total,
            "completed": 0,
            "failed": 0,
            "skipped": 0,
            "enqueued": 0,
        }
        for name in ("in_progress_at", "failed_at", "owner"):
            if getattr(batch, name) is not None:
                fields[name] = getattr(batch, name)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(redis_keys.batch_key(batch.id), mapping=fields)
        pipe.zadd(redis_keys.BATCHES, {batch.id: batch.created_at})
        if batch.owner is not None:
            pipe.zadd(redis_keys.batches_of(batch.owner), {batch.id: batch.created_at})
        if not batch.status.final:
            pipe.sadd(redis_keys.BATCHES_ACTIVE, batch.id)
        await pipe.execute()

    async def load(self, batch_id: str) -> Batch:
        raw = await self._redis.hgetall(redis_keys.batch_key(batch_id))
        if not raw:
            raise BatchNotFound(f"No batch {batch_id!r}.", param="batch_id")
        return from_hash({str(k): str(v) for k, v in raw.items()})

    async def update(self, batch_id: str, **fields: Any) -> None:
        values: dict[Any, Any] = {
            k: (v.value if isinstance(v, BatchState) else v) for k, v in fields.items()
        }
        await self._redis.hset(redis_keys.batch_key(batch_id), mapping=values)

    async def set_status(self, batch_id: str, status: BatchState, **fields: Any) -> None:
        stamp = {
            BatchState.IN_PROGRESS: "in_progress_at",
            BatchState.FINALIZING: "finalizing_at",
            BatchState.COMPLETED: "completed_at",
            BatchState.FAILED: "failed_at",
            BatchState.EXPIRED: "expired_at",
            BatchState.CANCELLING: "cancelling_at",
            BatchState.CANCELLED: "cancelled_at",
        }.get(status)
        if stamp:
            fields[stamp] = int(time.time())
        await self.update(batch_id, status=status, **fields)
        log.info("batch=%s status=%s", batch_id, status.value)

    async def list(
        self, after: str | None, limit: int, viewer: str | None = None
    ) -> tuple[list[Batch], bool]:
        """Newest first, OpenAI's cursor paging; returns (page, has_more). `viewer` limits
        it to the batches of one owner (`gateway.tenancy.ownership`), read from that owner's index
        (`gateway.batches.owner_index`): a page costs the same however many batches others made."""
        index = redis_keys.BATCHES if viewer is None else redis_keys.batches_of(viewer)
        start = 0
        if after is not None:
            found = await owner_index.start_after(self._redis, index, after)
            if found is None:  # another owner's batch is unknown here too
                raise InvalidRequest(f"Unknown cursor {after!r}.", param="after")
            start = found
        ids = await owner_index.page(self._redis, index, start, limit + 1)
        pipe = self._redis.pipeline(transaction=False)
        for i in ids[:limit]:
            pipe.hgetall(redis_keys.batch_key(i))
        page = [
            from_hash({str(k): str(v) for k, v in raw.items()})
            for raw in await pipe.execute()
            if raw
        ]
        return page, len(ids) > limit

    async def index_owners(self) -> int:
        """Batches made before the per-owner indexes, into them (`owner_index.backfill`)."""

        async def owners(ids: list[str]) -> list[bytes | str | None]:
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.hget(redis_keys.batch_key(i), "owner")
            return await pipe.execute()

        return await owner_index.backfill(
            self._redis, redis_keys.BATCHES, owners, redis_keys.batches_of
        )

    async def begin_finalizing(self, batch_id: str) -> bool:
        """Mark the batch finalizing if it still runs (or its finalizer died): True if
        this caller is the one to write its files and end it."""
        started = await self._finalize(
            keys=[redis_keys.batch_key(batch_id)],
            args=[
                BatchState.IN_PROGRESS.value,
                BatchState.CANCELLING.value,
                BatchState.FINALIZING.value,
                int(time.time()),
                STALE_FINALIZING_S,
            ],
        )
        if started:
            log.info("batch=%s status=%s", batch_id, BatchState.FINALIZING.value)
        return bool(started)

    async def active_using(self, file_id: str) -> str | None:
        """An unfinished batch whose input is `file_id`, if any: it rereads its input to
        resume an enqueue, resend lost items and write its output in input order."""
        ids = sorted(map(str, await self._redis.smembers(redis_keys.BATCHES_ACTIVE)))
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hget(redis_keys.batch_key(batch_id), "static")
        for batch_id, static in zip(ids, await pipe.execute(), strict=True):
            if static and json.loads(static).get("input_file_id") == file_id:
                return batch_id
        return None

    async def cancel(self, batch_id: str) -> Batch:
        """Items not started are skipped; running ones finish and are reported. Only a
        batch in progress starts cancelling (batches are stored in progress, never
        validating); cancelling one that is already cancelling or cancelled is a no-op."""
        was = await self._cancel(
            keys=[redis_keys.batch_key(batch_id)],
            args=[BatchState.IN_PROGRESS.value, BatchState.CANCELLING.value, int(time.time())],
        )
        if was is None:
            raise BatchNotFound(f"No batch {batch_id!r}.", param="batch_id")
        status = BatchState(was.decode() if isinstance(was, bytes) else was)
        if status is BatchState.IN_PROGRESS:
            log.info("batch=%s status=%s", batch_id, BatchState.CANCELLING.value)
        elif status not in (BatchState.CANCELLING, BatchState.CANCELLED):
            raise InvalidRequest(
                f"Batch {batch_id!r} is {status.value}; it can no longer be cancelled.",
                code="batch_not_cancellable",
                status=409,
            )
        return await self.load(batch_id)


def from_hash(raw: dict[str, str]) -> Batch:
    data: dict[str, Any] = json.loads(raw["static"])
    data["status"] = raw["status"]
    data["request_counts"] = RequestCounts(
        total=int(raw.get("total", 0)),
        completed=int(raw.get("completed", 0)),
        failed=int(raw.get("failed", 0)),
    )
    for name in (
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        if raw.get(name):
            data[name] = int(float(raw[name]))
    for name in ("output_file_id", "error_file_id", "owner"):
        if raw.get(name):
            data[name] = raw[name]
    return Batch.model_validate(data)


def failed_batch(
    input_file_id: str,
    endpoint: str,
    window: str,
    errors: list[LineError],
    metadata: dict[str, str] | None,
    owner: str | None,
) -> Batch:
    now = int(time.time())
    return Batch(
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=window,
        status=BatchState.FAILED,
        errors=BatchErrors(data=errors),
        failed_at=now,
        metadata=metadata,
        owner=owner,
    )
