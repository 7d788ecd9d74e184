"""Step 2 of the request path: a validated request becomes a Celery task on its queue.

The enqueue is one Redis round trip on the event loop: a script checks the model's queue
depth and, within the cap, writes the request's record and LPUSHes the task message; the
task's `task-sent` event for Flower is built and PUBLISHed after it, off the path to the
first token (`gateway.queueing.task_message` builds both as kombu would), and only while
someone hears it: a PUBLISH that reached no subscriber (no Flower) stops the events, but
for one every `EVENT_RECHECK_S` that looks for a listener again.
`send_task` would cost a thread hop and more before the first token. Cancelling sets
a cancel key the worker checks before and while it runs, and revokes the task id (on a
small thread pool: `revoke` blocks, in kombu) so a worker that has not fetched it yet
discards it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from prometheus_client import Counter
from redis.exceptions import RedisError

from common import redis_keys
from common.celery_config import celery_config
from common.errors import CorralError, QueueFull
from common.frames import out_of_band_error
from common.jobs import Job
from common.settings import Settings
from common.tracking import RequestState
from gateway.queueing.affinity import Preference, Spills
from gateway.queueing.records import Tracker
from gateway.queueing.task_message import TaskMessage, TaskMessages

log = logging.getLogger(__name__)

CANCEL_TTL_S = 3600
CANCEL_RETRY_S = 120.0  # a cancel the broker missed is tried again this long
EVENT_RECHECK_S = 1.0  # while nobody hears `task-sent` events, one is sent this often

# KEYS: the shared queue's list, the request record, the queue's binding table and its
# permanent set, the recent-requests list, the queue's live set (`redis_keys.live_key`),
# the client id's key (`redis_keys.client_request_key`), then with affinity: the key's
# last-replica key and each ready replica's affinity queue.
# ARGV: the cap (-1: none), the record's TTL, the binding, the message, the request id, the
# recent list's length, the deadline, now, the client's id ("": none), the number n of
# ready replicas, their worker ids, then the record's fields.
# The cap counts the live requests of this priority only (a low flood cannot take a high
# request's room), and dead ones (cancelled, expired) leave the count as they die. With
# replicas, the message goes to the affinity queue of the one that ran the key last if it
# is among them ("hit"), else to the shared queue ("new"); the record says which.
# Returns {1 if enqueued else 0, the depth found, "hit"|"new"|"", the replica chosen}.
ENQUEUE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[8])
local depth = redis.call('ZCARD', KEYS[6])
local cap = tonumber(ARGV[1])
if cap >= 0 and depth >= cap then return {0, depth, '', ''} end
local n = tonumber(ARGV[10])
local target, result, chosen = KEYS[1], '', ''
if n > 0 then
  local last = redis.call('GET', KEYS[8])
  result = 'new'
  for i = 1, n do
    if ARGV[10 + i] == last then
      target, chosen, result = KEYS[8 + i], last, 'hit'
      break
    end
  end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 11 + n))
if result == 'hit' then redis.call('HSET', KEYS[2], 'affinity', 'hit', 'affinity_worker', chosen)
elseif result == 'new' then redis.call('HSET', KEYS[2], 'affinity', 'new') end
if ARGV[9] ~= '' then redis.call('SET', KEYS[7], ARGV[5], 'EX', ARGV[2]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('LPUSH', target, ARGV[4])
redis.call('LPUSH', KEYS[5], ARGV[5])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[6]) - 1)
redis.call('ZADD', KEYS[6], ARGV[7], ARGV[5])
redis.call('EXPIRE', KEYS[6], ARGV[2])
return {1, depth, result, chosen}
"""


class Listeners:
    """Whether anyone (Flower) hears the `task-sent` events: a PUBLISH answers how many
    subscribers got it. After one nobody heard, `wanted` is False for `EVENT_RECHECK_S`,
    so a listener that subscribes misses at most that long of events."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._unheard_at: float | None = None

    def wanted(self) -> bool:
        since = self._unheard_at
        return since is None or self._clock() - since >= EVENT_RECHECK_S

    def heard(self, receivers: int) -> None:
        self._unheard_at = None if receivers > 0 else self._clock()


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        client: aioredis.Redis,
        affinity: Counter | None = None,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._celery = Celery("corral-gateway", set_as_current=False)
        self._celery.conf.update(celery_config(settings, redis_url=redis_url))
        self._messages = TaskMessages(self._celery)
        self._enqueue = client.register_script(ENQUEUE_LUA)
        self.tracker = Tracker(client)
        self._affinity_counter = affinity  # `corral_affinity_total`, by model and result
        self.spills = Spills(client, affinity)
        self._later: set[asyncio.Task[None]] = set()  # cancels waiting for the broker
        self._listeners = Listeners()  # of the `task-sent` events
        self._pool = ThreadPoolExecutor(
            max_workers=min(32, settings.broker_pool_limit), thread_name_prefix="corral-dispatch"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._celery.close()

    async def submit(
        self,
        job: Job,
        *,
        resubmit: bool = False,
        client_id: str | None = None,
        affinity: Preference | None = None,
    ) -> None:
        """Enqueue `job` on its model's queue for its priority, within the depth cap (a
        resubmit is always let in), and record it (`GET /v1/requests/{id}`, also by the
        client's own `client_id`). With an `affinity` preference it goes to one replica's
        own queue, for `affinity.wait` seconds (`gateway.queueing.affinity`)."""
        message = self._messages.build(job, redis_keys.queue_name(job.model, job.priority))
        fields, ttl = self.tracker.record_fields(job, client_id)
        route = message.route
        limit = self._settings.max_queue_size_per_model
        replicas = list(affinity.replicas) if affinity is not None else []
        keys = [
            route.list_key,
            redis_keys.request_key(job.request_id),
            route.binding_key,
            route.permanent_key,
            redis_keys.RECENT_REQUESTS,
            redis_keys.live_key(route.queue),
            redis_keys.client_request_key(job.owner, client_id or ""),
        ]
        if replicas and job.affinity is not None:
            keys.append(redis_keys.affinity_key(job.model, job.affinity))
            keys += [redis_keys.affinity_queue(job.model, job.priority, w) for w in replicas]
        else:
            replicas = []
        enqueued, depth, result, chosen = await self._enqueue(
            keys=keys,
            args=[
                -1 if resubmit else limit,
                ttl,
                route.binding,
                message.entry,
                job.request_id,
                redis_keys.RECENT_MAX,
                job.deadline,
                time.time(),
                client_id or "",
                len(replicas),
                *replicas,
                *(item for pair in fields.items() for item in pair),
            ],
        )
        if not enqueued:
            raise QueueFull(
                f"The {job.priority.value} queue for model {job.model!r} is full ({depth} "
                f"waiting, limit {limit}). Retry later.",
                retry_after=5,
            )
        routed = ""
        if affinity is not None and result:
            worker, outcome = redis_keys.text(chosen), redis_keys.text(result)
            if self._affinity_counter is not None:
                self._affinity_counter.labels(model=job.model, result=outcome).inc()
            routed = f" affinity={outcome}"
            if worker:  # waiting in that replica's own queue, for `affinity.wait` at most
                self.spills.after(affinity.wait, job, worker, message.entry)
                routed += f" replica={worker}"
        if self._listeners.wanted():  # for Flower; the worker has the task already
            await self._send_event(job, message)
        log.info(
            "job=%s model=%s priority=%s kind=%s stream=%s enqueued%s",
            job.request_id,
            job.model,
            job.priority.value,
            job.kind.value,
            job.stream,
            routed,
        )

    async def _send_event(self, job: Job, message: TaskMessage) -> None:
        event = self._messages.sent_event(message)
        if event is None:
            return
        try:
            self._listeners.heard(int(await self._redis.publish(event.channel, event.payload)))
        except RedisError as exc:  # the task is queued: a lost event must not fail it
            log.warning("job=%s task-sent event not sent: %r", job.request_id, exc)

    async def send_batch_items(self, jobs: list[Job]) -> None:
        """Enqueue batch items on their model's batch queue: below every interactive
        priority, and outside the interactive depth cap (a batch may hold thousands).
        The messages are built off the event loop (a chunk is CPU work), then pushed in
        one pipelined round trip."""
        loop = asyncio.get_running_loop()
        messages = await loop.run_in_executor(self._pool, self._build_batch, jobs)
        pipe = self._redis.pipeline(transaction=False)
        by_queue: dict[str, list[TaskMessage]] = {}
        for message in messages:
            by_queue.setdefault(message.route.queue, []).append(message)
        for queued in by_queue.values():
            route = queued[0].route
            pipe.sadd(route.binding_key, route.binding)
            pipe.sadd(route.permanent_key, route.binding)
            pipe.lpush(route.list_key, *(m.entry for m in queued))  # in order, oldest first
        for message in messages:
            if (event := self._messages.sent_event(message)) is not None:
                pipe.publish(event.channel, event.payload)
        await pipe.execute()

    def _build_batch(self, jobs: list[Job]) -> list[TaskMessage]:
        return [self._messages.build(job, redis_keys.batch_queue(job.model)) for job in jobs]

    async def cancel(
        self,
        request_id: str,
        *,
        started: bool,
        model: str | None = None,
        state: RequestState = RequestState.CANCELLED,
        failure: CorralError | None = None,
    ) -> None:
        """Make sure `request_id` never runs, or stops running (its worker sees the key
        between chunks and closes its llama-server stream, which frees the slot). A task
        not started yet is also revoked, so a worker that fetches it discards it unrun.
        A request given up on a `failure` (its worker lost, its stream broken) is recorded
        failed with it, even if it had started: its worker may never write its end."""
        await self._redis.set(redis_keys.cancel_key(request_id), "1", ex=CANCEL_TTL_S)
        if not started and model is not None:  # no longer counted as waiting
            pipe = self._redis.pipeline(transaction=False)
            for live in redis_keys.live_keys(model):
                pipe.zrem(live, request_id)
            await pipe.execute()
        if failure is not None:
            await self.tracker.end_if_queued(
                request_id, RequestState.FAILED, failure.message, running_too=True
            )
        elif not started:
            await self.tracker.end_if_queued(request_id, state, f"{state.value} while queued")
        if not started:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._revoke, request_id)
        log.info("job=%s %s started=%s", request_id, state.value, started)

    async def cancel_soon(self, request_id: str, **how: Any) -> None:
        """`cancel`, for a request given up on (its client left, it failed): with the
        broker away (restarting), tried again in the background until it is back (for
        `CANCEL_RETRY_S` at most), so its record still ends and its worker still stops."""
        try:
            await self.cancel(request_id, **how)
        except RedisError as exc:
            log.warning("job=%s cancel deferred, Redis unavailable: %r", request_id, exc)
            task = asyncio.create_task(self._cancel_later(request_id, how))
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _cancel_later(self, request_id: str, how: dict[str, Any]) -> None:
        deadline = time.monotonic() + CANCEL_RETRY_S
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                await self.cancel(request_id, **how)
                return
            except RedisError:
                continue
        log.warning("job=%s cancel given up: Redis away for %.0f s", request_id, CANCEL_RETRY_S)

    async def notify(self, channel: str, err: CorralError) -> None:
        """End a request's stream from outside its worker (an out-of-band final frame)."""
        await self._redis.publish(channel, out_of_band_error(err))

    def _revoke(self, request_id: str) -> None:
        try:
            self._celery.control.revoke(request_id)
        except Exception as exc:  # the cancel key alone is enough; revoke only saves a fetch
            log.warning("job=%s revoke failed: %r", request_id, exc)
