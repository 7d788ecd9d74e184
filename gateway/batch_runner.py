"""Runs accepted batches to the end, from whichever gateway is alive.

`create` checks the input file and enqueues every item (a task per line, on the model's
batch queue: below every interactive priority). A supervisor loop runs in every gateway,
but only the one holding the leader lock acts: it resumes an enqueue that a dead gateway
left half done, re-queues items whose worker died mid-run (their claims let each run once
more, and the results hash takes each `custom_id` once), expires overdue batches, and
finalizes batches whose items are all accounted for into output and error files. So a
gateway restart or a kill -9 of a worker never loses an item nor writes one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.batch import (
    Batch,
    BatchLine,
    BatchState,
    LineError,
    RequestCounts,
    parse_input,
)
from common.errors import CorralError, InvalidRequest, PermissionDenied
from common.tracking import split_running_member
from gateway import batch_output
from gateway.aio import cancel_and_wait
from gateway.batches import (
    KINDS,
    WINDOWS,
    BatchNotFound,
    BatchStore,
    failed_batch,
    item_id,
    item_job,
)
from gateway.catalog import Catalog
from gateway.dispatch import Dispatcher
from gateway.leader import LeaderLock
from gateway.tenancy import EVERYONE, Caller

log = logging.getLogger(__name__)

Place = Callable[[str], Awaitable[None]]

CHUNK = 100  # items per enqueue round (and per progress record)
LEASE_S = 5  # refreshed every chunk; a dead gateway's enqueue resumes within this
MAX_RESENDS = 3  # an item lost this many times is reported failed
STALL_S = 3.0  # nothing queued or running for this long, yet results missing: resend
PLACE_EVERY_S = 5.0  # how often a batch with items left asks for its models to be placed
CANCEL_GRACE_S = 30  # a cancelling batch whose queued items nobody takes ends after this


class FileNotFound(CorralError):
    status = 404
    type = "invalid_request_error"
    default_code = "file_not_found"


class BatchRunner:
    def __init__(self, client: aioredis.Redis, store: BatchStore, dispatcher: Dispatcher,
                 catalog: Catalog, gateway_id: str, place: Place | None = None,
                 interval: float = 1.0) -> None:  # fmt: skip
        self._redis = client
        self.store = store
        self._dispatcher = dispatcher
        self._catalog = catalog
        self._id = gateway_id
        self._interval = interval
        self._place = place  # starts a load of a model no worker holds (issue 3's placer)
        self._lines: dict[str, list[BatchLine]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stalled: dict[str, float] = {}  # batch id -> when it was first seen stalled
        self._placed_at: dict[str, float] = {}  # batch id -> when its models were last placed
        self._leader = LeaderLock(client, keys.BATCH_LEADER, gateway_id, ttl=5)

    # -- creation -----------------------------------------------------------------
    async def create(self, input_file_id: str, endpoint: str, window: str,
                     metadata: dict[str, str] | None,
                     caller: Caller = EVERYONE) -> Batch:  # fmt: skip
        """The input file must be the caller's, and its models ones the caller may use;
        the batch, its items and its result files are the caller's."""
        if endpoint not in KINDS:
            raise InvalidRequest(f"Unsupported endpoint {endpoint!r}: use {', '.join(KINDS)}.",
                                 param="endpoint")  # fmt: skip
        if window not in WINDOWS:
            raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
        meta = await self.store.files.get(input_file_id)
        if meta is None or not caller.sees(meta.owner):
            raise FileNotFound(f"No file {input_file_id!r}.", param="input_file_id")
        if meta.purpose != "batch":
            raise InvalidRequest(f"File {input_file_id!r} has purpose {meta.purpose!r}, "
                                 "not 'batch'.", param="input_file_id")  # fmt: skip
        lines, errors = await self._parse(input_file_id, endpoint)
        models = {str(ln.body["model"]) for ln in lines}
        refused = sorted(m for m in models if not caller.allows_model(m))
        if refused:
            raise PermissionDenied(f"This API key may not use the model(s) {', '.join(refused)}.",
                                   param="input_file_id", code="model_not_allowed")  # fmt: skip
        if errors:
            batch = failed_batch(input_file_id, endpoint, window, errors, metadata, caller.owner)
            await self.store.save_new(batch)
            return batch
        await self._ensure_placed(models)
        now = int(time.time())
        batch = Batch(
            endpoint=endpoint, input_file_id=input_file_id, completion_window=window,
            status=BatchState.IN_PROGRESS, in_progress_at=now, expires_at=now + WINDOWS[window],
            request_counts=RequestCounts(total=len(lines)), metadata=metadata,
            owner=caller.owner,
        )  # fmt: skip
        await self.store.save_new(batch)
        self._lines[batch.id] = lines
        log.info("batch=%s created items=%d endpoint=%s", batch.id, len(lines), endpoint)
        self._spawn(self._enqueue(batch, lines, 0))
        return batch

    async def _ensure_placed(self, models: set[str]) -> None:
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
        lease = LeaderLock(self._redis, keys.batch_enqueue_lease(batch.id),
                           f"{self._id}:{uuid.uuid4().hex}", ttl=LEASE_S)  # fmt: skip
        if not await lease.hold():
            return  # another enqueue is on it
        try:
            done = int(await self._redis.hget(keys.batch_key(batch.id), "enqueued") or 0)
            for first in range(max(start, done), len(lines), CHUNK):
                status = await self._redis.hget(keys.batch_key(batch.id), "status")
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
    async def run(self) -> None:
        while True:
            try:
                if await self._lead():
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch supervisor round failed")
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)

    async def _lead(self) -> bool:
        return await self._leader.hold()

    async def tick(self) -> None:
        """One round over the active batches; one that fails does not hold up the rest."""
        await self._requeue_lost()
        for batch_id in sorted(map(str, await self._redis.smembers(keys.BATCHES_ACTIVE))):
            if not await self._lead():  # a long round outlived the lock: another leads now
                return
            try:
                await self._supervise(await self.store.load(batch_id))
            except BatchNotFound:  # its record is gone: nothing left to supervise
                await self._redis.srem(keys.BATCHES_ACTIVE, batch_id)
            except FileNotFound:
                await self._input_lost(batch_id)
            except Exception:
                log.exception("batch=%s supervision failed; the next round tries again",
                              batch_id)  # fmt: skip

    async def _input_lost(self, batch_id: str) -> None:
        """Its input file is gone (deleted before deletes checked for unfinished batches,
        or by hand in Redis): it can be neither resumed nor written out in input order."""
        log.error("batch=%s input file is gone: the batch ends failed", batch_id)
        await self.store.set_status(batch_id, BatchState.FAILED)
        await self._redis.srem(keys.BATCHES_ACTIVE, batch_id)
        self._lines.pop(batch_id, None)
        self._placed_at.pop(batch_id, None)

    async def _supervise(self, batch: Batch) -> None:
        raw = await self._redis.hmget(keys.batch_key(batch.id), ["enqueued", "skipped"])
        enqueued, skipped = (int(v or 0) for v in raw)
        counts = batch.request_counts
        done = counts.completed + counts.failed + skipped
        now = time.time()
        enqueuing = await self._redis.exists(keys.batch_enqueue_lease(batch.id))
        if batch.status is BatchState.IN_PROGRESS and enqueued < counts.total and not enqueuing:
            self._spawn(self._enqueue(batch, await self.lines(batch), enqueued))
        if batch.status is BatchState.CANCELLING and not enqueuing:
            done += counts.total - enqueued  # never enqueued: nothing to wait for
        if batch.status is BatchState.IN_PROGRESS and done < counts.total:
            await self._keep_placed(batch)
        if batch.status is BatchState.IN_PROGRESS and enqueued >= counts.total > done:
            await self._sweep(batch)
        if done >= counts.total:
            final = BatchState.CANCELLED if batch.status is BatchState.CANCELLING else (
                BatchState.COMPLETED)  # fmt: skip
            await self.finalize(batch, final)
        elif batch.expires_at and now > batch.expires_at:
            await self.finalize(batch, BatchState.EXPIRED)
        elif (
            batch.status is BatchState.CANCELLING
            and batch.cancelling_at
            and (now - batch.cancelling_at > CANCEL_GRACE_S)
        ):
            await self.finalize(batch, BatchState.CANCELLED)

    async def _keep_placed(self, batch: Batch) -> None:
        """Every `PLACE_EVERY_S`, ask for the batch's models to be placed, as a request
        would: the placement at creation may have had to wait (another model within its
        residency, no worker up yet), and only requests with a waiting client are planned
        again by the placer; queued items would wait for a copy until the batch expired."""
        now = time.monotonic()
        if now - self._placed_at.get(batch.id, -PLACE_EVERY_S) < PLACE_EVERY_S:
            return
        self._placed_at[batch.id] = now
        with contextlib.suppress(CorralError):  # cannot fit now: asked again next time
            await self._ensure_placed({str(line.body["model"]) for line in await self.lines(batch)})

    async def _sweep(self, batch: Batch) -> None:
        """Items can be lost where no record shows them: a task a worker had fetched but
        not started when it died stays unacked until kombu's visibility timeout (hours).
        When nothing of the batch is queued or running for a while yet items lack a
        result, send those again (their results are still taken once)."""
        lines = await self.lines(batch)
        models = {str(line.body["model"]) for line in lines}
        busy = False
        for model in models:
            if await self._redis.llen(keys.batch_queue(model)):
                busy = True
            members = map(str, await self._redis.zrange(keys.running_key(model), 0, -1))
            busy = busy or any(m.endswith(f"|{batch.id}") or f"|{batch.id}-" in m
                               for m in members)  # fmt: skip
        if busy:
            self._stalled.pop(batch.id, None)
            return
        since = self._stalled.setdefault(batch.id, time.monotonic())
        if time.monotonic() - since < STALL_S:
            return
        self._stalled.pop(batch.id, None)
        have = set(map(str, await self._redis.hkeys(keys.batch_results_key(batch.id))))
        missing = [(i, line) for i, line in enumerate(lines) if line.custom_id not in have]
        resend = []
        for i, line in missing:
            tries = await self._redis.hincrby(keys.batch_attempts_key(batch.id), line.custom_id)
            if tries > MAX_RESENDS:
                await batch_output.record_lost(
                    self._redis, batch.id, item_id(batch.id, i), line.custom_id, MAX_RESENDS
                )
            else:
                resend.append(item_job(batch, i, line))
        log.warning("batch=%s stalled: %d item(s) lost, %d queued again", batch.id,
                    len(missing), len(resend))  # fmt: skip
        with contextlib.suppress(CorralError):
            await self._ensure_placed(models)
        await self._dispatcher.send_batch_items(resend)

    async def _requeue_lost(self) -> None:
        """Batch items that were running on a worker whose heartbeat is gone run again."""
        for model in await self._catalog.all():
            members = map(str, await self._redis.zrange(keys.running_key(model), 0, -1))
            for member in members:
                worker, request_id = split_running_member(member)
                if await self._redis.exists(keys.worker_key(worker)):
                    continue
                await self._redis.zrem(keys.running_key(model), member)
                if request_id.startswith("batch_"):
                    await self._requeue(request_id)

    async def _requeue(self, request_id: str) -> None:
        batch_id, _, index = request_id.rpartition("-")
        try:
            batch = await self.store.load(batch_id)
        except CorralError:
            return
        lines = await self.lines(batch)
        line = lines[int(index)]
        if batch.status.final or await self._redis.hexists(
            keys.batch_results_key(batch_id), line.custom_id
        ):
            return
        log.warning("batch=%s item=%s lost with its worker; queued again", batch_id, index)
        await self._dispatcher.send_batch_items([item_job(batch, int(index), line)])

    async def finalize(self, batch: Batch, final: BatchState) -> None:
        """Write the output and error files in input order, then end the batch; unless
        another gateway is doing so already."""
        if not await self.store.begin_finalizing(batch.id):
            return
        files = await batch_output.write_files(self._redis, self.store.files, batch, final,
                                               await self.lines(batch))  # fmt: skip
        await self.store.set_status(batch.id, final, **files)
        await self._redis.srem(keys.BATCHES_ACTIVE, batch.id)
        self._lines.pop(batch.id, None)
        self._placed_at.pop(batch.id, None)
