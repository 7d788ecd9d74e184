"""Creates batches and enqueues their items.

`create` checks the input file (the caller's, its models ones the caller may use) and
enqueues every item, a task per line, on the model's batch queue: below every interactive
priority. Enqueues go a chunk at a time under a lease, so the batch supervisor
(`gateway.batches.supervisor`) can resume one a dead gateway left half done; it also reads
the batch's lines from here (parsed once per gateway).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.batch import (
    Batch,
    BatchLine,
    BatchState,
    LineError,
    RequestCounts,
    parse_input,
)
from common.errors import FileNotFound, InvalidRequest, PermissionDenied
from gateway.aio import cancel_and_wait
from gateway.batches.store import (
    KINDS,
    WINDOWS,
    BatchStore,
    failed_batch,
    item_job,
)
from gateway.catalog import Catalog
from gateway.leader import LeaderLock
from gateway.queueing.dispatch import Dispatcher
from gateway.tenancy.ownership import EVERYONE, Caller

log = logging.getLogger(__name__)

Place = Callable[[str], Awaitable[None]]

CHUNK = 100  # items per enqueue round (and per progress record)
LEASE_S = 5  # refreshed every chunk; a dead gateway's enqueue resumes within this


class BatchRunner:
    def __init__(
        self,
        client: aioredis.Redis,
        store: BatchStore,
        dispatcher: Dispatcher,
        catalog: Catalog,
        gateway_id: str,
        place: Place | None = None,
    ) -> None:
        self._redis = client
        self.store = store
        self._dispatcher = dispatcher
        self._catalog = catalog
        self._id = gateway_id
        self._place = place  # starts a load of a model no worker holds (the placer)
        self._lines: dict[str, list[BatchLine]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- creation -----------------------------------------------------------------
    async def create(
        self,
        input_file_id: str,
        endpoint: str,
        window: str,
        metadata: dict[str, str] | None,
        caller: Caller = EVERYONE,
    ) -> Batch:
        """The input file must be the caller's, and its models ones the caller may use;
        the batch, its items and its result files are the caller's."""
        if endpoint not in KINDS:
            raise InvalidRequest(
                f"Unsupported endpoint {endpoint!r}: use {', '.join(KINDS)}.", param="endpoint"
            )
        if window not in WINDOWS:
            raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
        missing = FileNotFound(f"No file {input_file_id!r}.", param="input_file_id")
        meta = caller.own(await self.store.files.get(input_file_id), missing)
        if meta.purpose != "batch":
            raise InvalidRequest(
                f"File {input_file_id!r} has purpose {meta.purpose!r}, not 'batch'.",
                param="input_file_id",
            )
        lines, errors = await self._parse(input_file_id, endpoint)
        models = {str(ln.body["model"]) for ln in lines}
        refused = sorted(m for m in models if not caller.allows_model(m))
        if refused:
            raise PermissionDenied(
                f"This API key may not use the model(s) {', '.join(refused)}.",
                param="input_file_id",
                code="model_not_allowed",
            )
        if errors:
            batch = failed_batch(input_file_id, endpoint, window, errors, metadata, caller.owner)
            await self.store.save_new(batch)
            return batch
        await self.ensure_placed(models)
        now = int(time.time())
        batch = Batch(
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=window,
            status=BatchState.IN_PROGRESS,
            in_progress_at=now,
            expires_at=now + WINDOWS[window],
            request_counts=RequestCounts(total=len(lines)),
            metadata=metadata,
            owner=caller.owner,
        )
        await self.store.save_new(batch)
        self._lines[batch.id] = lines
        log.info("batch=%s created items=%d endpoint=%s", batch.id, len(lines), endpoint)
        self._spawn(self._enqueue(batch, lines, 0))
        return batch

    async def ensure_placed(self, models: set[str]) -> None:
        """Cold models are loaded like for any request; one that can never fit is a 503
        now rather than a batch that waits until it expires."""
        for model in sorted(models):
            if self._place is not None:
                await self._place(model)

    async def _parse(self, file_id: str, endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
        content = await self.store.files.content(file_id)
        if content is None:
            raise FileNotFound(f"No file {file_id!r}.", param="input_file_id")
        return parse_input(content.encode(), set(await self._catalog.all()), endpoint)

    async def lines(self, batch: Batch) -> list[BatchLine]:
        if batch.id not in self._lines:
            self._lines[batch.id], _ = await self._parse(batch.input_file_id, batch.endpoint)
        return self._lines[batch.id]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, batch: Batch, lines: list[BatchLine], start: int) -> None:
        """Enqueue the items from `start` on, a chunk at a time, under a lease of this call's
        own (so a second call never runs beside it, even in this gateway). The lease is
        checked and refreshed before each chunk: a call whose loop stalled past it stops,
        and the one that took over starts from `enqueued` as read once it held the lease,
        so no item is enqueued twice."""
        lease = LeaderLock(
            self._redis,
            redis_keys.batch_enqueue_lease(batch.id),
            f"{self._id}:{uuid.uuid4().hex}",
            ttl=LEASE_S,
        )
        if not await lease.hold():
            return  # another enqueue is on it
        try:
            done = int(await self._redis.hget(redis_keys.batch_key(batch.id), "enqueued") or 0)
            for first in range(max(start, done), len(lines), CHUNK):
                status = await self._redis.hget(redis_keys.batch_key(batch.id), "status")
                if status != BatchState.IN_PROGRESS.value:
                    break
                if not await lease.hold():
                    log.warning("batch=%s enqueue lease lost; another enqueue goes on", batch.id)
                    return
                chunk = lines[first : first + CHUNK]
                jobs = [item_job(batch, first + i, line) for i, line in enumerate(chunk)]
                await self._dispatcher.send_batch_items(jobs)
                await self.store.update(batch.id, enqueued=first + len(chunk))
            log.info("batch=%s enqueued", batch.id)
        except Exception:
            log.exception("batch=%s enqueue interrupted; the supervisor resumes it", batch.id)
        finally:
            await lease.release()

    # -- supervision ----------------------------------------------------------------
    def resume(self, batch: Batch, lines: list[BatchLine], start: int) -> None:
        """Enqueue what an earlier enqueue did not, in the background (see `_enqueue`)."""
        self._spawn(self._enqueue(batch, lines, start))

    def forget(self, batch_id: str) -> None:
        """The batch ended: its lines are no longer needed here."""
        self._lines.pop(batch_id, None)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)
