"""The batch supervisor: one gateway at a time (the holder of the leader lock) carries
every accepted batch to its end.

Each round it re-queues items whose worker died mid-run (their claims let each run once
more, and the results hash takes each `custom_id` once), resumes an enqueue that a dead
gateway left half done, asks now and then for the models of batches with items left to be
placed, resends items lost where no record shows them, expires overdue batches, and
finalizes batches whose items are all accounted for into output and error files. So a
gateway restart or a kill -9 of a worker never loses an item nor writes one twice.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis.asyncio as aioredis

from common import redis_keys
from common.batch import Batch, BatchState
from common.errors import BatchNotFound, CorralError, FileNotFound
from gateway import cluster
from gateway.batches import output
from gateway.batches.intake import BatchRunner
from gateway.batches.store import item_id, item_job
from gateway.catalog import Catalog
from gateway.leader import LeaderDuty, LeaderLock
from gateway.queueing.dispatch import Dispatcher

log = logging.getLogger(__name__)

MAX_RESENDS = 3  # an item lost this many times is reported failed
STALL_S = 3.0  # nothing queued or running for this long, yet results missing: resend
PLACE_EVERY_S = 5.0  # how often a batch with items left asks for its models to be placed
CANCEL_GRACE_S = 30  # a cancelling batch whose queued items nobody takes ends after this


class BatchSupervisor(LeaderDuty):
    name = "batch supervisor"

    def __init__(
        self,
        client: aioredis.Redis,
        runner: BatchRunner,
        dispatcher: Dispatcher,
        catalog: Catalog,
        gateway_id: str,
        interval: float = 1.0,
    ) -> None:
        self._redis = client
        self._runner = runner
        self.store = runner.store
        self._dispatcher = dispatcher
        self._catalog = catalog
        self.interval = interval
        self._stalled: dict[str, float] = {}  # batch id -> when it was first seen stalled
        self._placed_at: dict[str, float] = {}  # batch id -> when its models were last placed
        self._leader = LeaderLock(client, redis_keys.BATCH_LEADER, gateway_id, ttl=5)

    async def _lead(self) -> bool:
        return await self._leader.hold()

    async def tick(self) -> None:
        """One round over the active batches; one that fails does not hold up the rest."""
        await self._requeue_lost()
        for batch_id in sorted(map(str, await self._redis.smembers(redis_keys.BATCHES_ACTIVE))):
            if not await self._lead():  # a long round outlived the lock: another leads now
                return
            try:
                await self._supervise(await self.store.load(batch_id))
            except BatchNotFound:  # its record is gone: nothing left to supervise
                await self._redis.srem(redis_keys.BATCHES_ACTIVE, batch_id)
            except FileNotFound:
                await self._input_lost(batch_id)
            except Exception:
                log.exception("batch=%s supervision failed; the next round tries again", batch_id)

    async def _input_lost(self, batch_id: str) -> None:
        """Its input file is gone (deleted before deletes checked for unfinished batches,
        or by hand in Redis): it can be neither resumed nor written out in input order."""
        log.error("batch=%s input file is gone: the batch ends failed", batch_id)
        await self.store.set_status(batch_id, BatchState.FAILED)
        await self._ended(batch_id)

    async def _supervise(self, batch: Batch) -> None:
        if batch.status.final:  # ended, but its removal from the active set was lost
            await self._ended(batch.id)
            return
        raw = await self._redis.hmget(redis_keys.batch_key(batch.id), ["enqueued", "skipped"])
        enqueued, skipped = (int(v or 0) for v in raw)
        counts = batch.request_counts
        done = counts.completed + counts.failed + skipped
        now = time.time()
        enqueuing = await self._redis.exists(redis_keys.batch_enqueue_lease(batch.id))
        if batch.status is BatchState.IN_PROGRESS and enqueued < counts.total and not enqueuing:
            self._runner.resume(batch, await self._runner.lines(batch), enqueued)
        if batch.status is BatchState.CANCELLING and not enqueuing:
            done += counts.total - enqueued  # never enqueued: nothing to wait for
        if batch.status is BatchState.IN_PROGRESS and done < counts.total:
            await self._keep_placed(batch)
        if batch.status is BatchState.IN_PROGRESS and enqueued >= counts.total > done:
            await self._sweep(batch)
        if done >= counts.total:
            final = (
                BatchState.CANCELLED
                if batch.status is BatchState.CANCELLING
                else (BatchState.COMPLETED)
            )
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
        models = {str(line.body["model"]) for line in await self._runner.lines(batch)}
        with contextlib.suppress(CorralError):  # cannot fit now: asked again next time
            await self._runner.ensure_placed(models)

    async def _sweep(self, batch: Batch) -> None:
        """Items can be lost where no record shows them: a task a worker had fetched but
        not started when it died stays unacked until kombu's visibility timeout (hours).
        When nothing of the batch is queued or running for a while yet items lack a
        result, send those again (their results are still taken once)."""
        lines = await self._runner.lines(batch)
        models = {str(line.body["model"]) for line in lines}
        busy = False
        for model in models:
            if await self._redis.llen(redis_keys.batch_queue(model)):
                busy = True
            members = map(str, await self._redis.zrange(redis_keys.running_key(model), 0, -1))
            busy = busy or any(m.endswith(f"|{batch.id}") or f"|{batch.id}-" in m for m in members)
        if busy:
            self._stalled.pop(batch.id, None)
            return
        since = self._stalled.setdefault(batch.id, time.monotonic())
        if time.monotonic() - since < STALL_S:
            return
        self._stalled.pop(batch.id, None)
        have = set(map(str, await self._redis.hkeys(redis_keys.batch_results_key(batch.id))))
        missing = [(i, line) for i, line in enumerate(lines) if line.custom_id not in have]
        resend = []
        for i, line in missing:
            tries = await self._redis.hincrby(
                redis_keys.batch_attempts_key(batch.id), line.custom_id
            )
            if tries > MAX_RESENDS:
                await output.record_lost(
                    self._redis, batch.id, item_id(batch.id, i), line.custom_id, MAX_RESENDS
                )
            else:
                resend.append(item_job(batch, i, line))
        log.warning(
            "batch=%s stalled: %d item(s) lost, %d queued again",
            batch.id,
            len(missing),
            len(resend),
        )
        with contextlib.suppress(CorralError):
            await self._runner.ensure_placed(models)
        await self._dispatcher.send_batch_items(resend)

    async def _requeue_lost(self) -> None:
        """Batch items that were running on a worker whose heartbeat is gone run again."""
        for model in await self._catalog.all():
            _, gone = await cluster.running(self._redis, model)
            for request_id in gone:
                if request_id.startswith("batch_"):
                    await self._requeue(request_id)

    async def _requeue(self, request_id: str) -> None:
        batch_id, _, index = request_id.rpartition("-")
        try:
            batch = await self.store.load(batch_id)
        except CorralError:
            return
        lines = await self._runner.lines(batch)
        line = lines[int(index)]
        if batch.status.final or await self._redis.hexists(
            redis_keys.batch_results_key(batch_id), line.custom_id
        ):
            return
        log.warning("batch=%s item=%s lost with its worker; queued again", batch_id, index)
        await self._dispatcher.send_batch_items([item_job(batch, int(index), line)])

    async def finalize(self, batch: Batch, final: BatchState) -> None:
        """Write the output and error files in input order, then end the batch; unless
        another gateway is doing so already."""
        if not await self.store.begin_finalizing(batch.id):
            return
        try:
            files = await output.write_files(
                self._redis, self.store.files, batch, final, await self._runner.lines(batch)
            )
        except BaseException:  # the next round may try again at once, not when it is stale
            with contextlib.suppress(Exception):
                await self._redis.hset(redis_keys.batch_key(batch.id), "finalizing_at", 0)
            raise
        await self.store.set_status(batch.id, final, **files)
        await self._ended(batch.id)

    async def _ended(self, batch_id: str) -> None:
        await self._redis.srem(redis_keys.BATCHES_ACTIVE, batch_id)
        self._runner.forget(batch_id)
        self._placed_at.pop(batch_id, None)
