"""Aging (`low_max_wait`, off by default): a low request that has waited longer
than `low_max_wait` seconds is promoted to its model's normal queue.

Why: under strict priority a low request waits as long as any high or normal one is
queued, which under steady interactive load can be forever. With `low_max_wait` set, it
waits at most that long before it competes with normal requests as one of them (high
requests still go first). Off by default, because strict priority is the promise.

How: one gateway at a time (the `AGING_LEADER` lock, `gateway.leader`, as for batches)
looks every `interval` at the right end of each model's low queue (kombu LPUSHes and
workers BRPOP, so the oldest message is there), reads its enqueue time and, if it waited
too long, promotes it, then the next one, stopping at the first that has not. A promotion
is one script (`PROMOTE_LUA`): only if the low list's last element is still exactly that
message (no worker took it meanwhile) is it popped and put in the normal queue where a
normal request enqueued at the same moment would be, just right of every younger one.
Usually no older normal request is still waiting, so that is the right end: the promoted
request is the next normal one to run. Placing by age rather than always at the right end
keeps promoted requests in their own order: one promoted later never passes one promoted
earlier that is still waiting. If the neighbour it was to go next to was taken meanwhile,
so was everything older, and the right end is again the place.

The moved message is addressed to the normal queue (kombu redelivers an unacked message
to its `delivery_info.routing_key`) and its job's priority becomes `normal` (the worker
copies it into the record when it starts). The record, if it still exists, gets
`priority: normal` and `promoted_at`, so `GET /v1/requests/{id}` shows the promotion and
finds the request's position in its new queue. The queue-depth cap (`gateway.queueing.dispatch`)
sums all of a model's interactive queues, so a promotion leaves the depth unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter

from common import redis_keys
from common.priority import Priority
from gateway.catalog import Catalog
from gateway.leader import LeaderDuty, LeaderLock
from gateway.queueing.records import enqueued_at
from gateway.queueing.task_message import set_task_body, task_body

log = logging.getLogger(__name__)

TICK_S = 0.5  # the longest pause between two looks at the low queues
LEADER_TTL_S = 5  # a dead leader's duty moves to another gateway within this

# KEYS: the low queue, the normal queue, the request's record, the low and normal live sets.
# ARGV: the message, its promoted form, the normal message to insert it before ("": none),
# the record's new priority, the promotion time, the request id.
# Returns 0 if the message is no longer last (untouched), 1 if placed before the given
# neighbour, 2 if pushed at the right end (no neighbour given, or it was gone).
PROMOTE_LUA = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
local placed = 0
if ARGV[3] ~= '' then placed = redis.call('LINSERT', KEYS[2], 'BEFORE', ARGV[3], ARGV[2]) end
if placed <= 0 then redis.call('RPUSH', KEYS[2], ARGV[2]) end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'priority', ARGV[4], 'promoted_at', ARGV[5])
end
local deadline = redis.call('ZSCORE', KEYS[4], ARGV[6])
if deadline then
  redis.call('ZREM', KEYS[4], ARGV[6])
  redis.call('ZADD', KEYS[5], deadline, ARGV[6])
end
if placed > 0 then return 1 end
return 2
"""


@dataclass
class Queued:
    """A normal queue's message and its enqueue time (None: not ours, or unreadable)."""

    message: str
    enqueued_at: float | None


def place(waiting: list[Queued], since: float) -> int:
    """Where a request enqueued at `since` goes in `waiting` (a normal queue, left to
    right): left of the run of older requests at the right end, so right of every younger
    one. `len(waiting)` means the right end."""
    at = len(waiting)
    while at > 0 and (older := waiting[at - 1].enqueued_at) is not None and older <= since:
        at -= 1
    return at


def retarget(message: str, queue: str, priority: Priority) -> tuple[str, str]:
    """The request id of `message` (kombu's Redis entry of a Celery task whose first
    argument is our `Job`), and the message addressed to `queue` with the job at
    `priority`. The rest (task id, delivery tag, expiry, enqueue time) is kept."""
    envelope = json.loads(message)
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    body = task_body(envelope)
    body[0][0]["priority"] = priority.value
    set_task_body(envelope, body)
    return str(body[0][0]["request_id"]), json.dumps(envelope)


class Promoter(LeaderDuty):
    name = "aging"

    def __init__(
        self,
        client: aioredis.Redis,
        catalog: Catalog,
        holder: str,
        max_wait: float,
        promotions: Counter | None = None,
    ) -> None:
        self._redis = client
        self._catalog = catalog
        self.max_wait = max_wait
        self.interval = min(TICK_S, max_wait / 4)  # promoted at most a quarter late
        self._leader = LeaderLock(client, redis_keys.AGING_LEADER, holder, LEADER_TTL_S)
        self._promote = client.register_script(PROMOTE_LUA)
        self._promotions = promotions  # `corral_promotions_total`, by model

    async def tick(self) -> int:
        """One look at every model's oldest low request; how many requests were promoted."""
        models = list(await self._catalog.all())
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.lindex(redis_keys.queue_name(model, Priority.LOW), -1)
        tails = await pipe.execute()
        now = time.time()
        count = 0
        for model, tail in zip(models, tails, strict=True):
            since = enqueued_at(redis_keys.text(tail)) if tail is not None else None
            if since is not None and now - since > self.max_wait:
                count += await self.promote(model)
        return count

    async def promote(self, model: str) -> int:
        """Promote `model`'s low requests that waited too long, oldest first; how many."""
        now = time.time()
        low = redis_keys.queue_name(model, Priority.LOW)
        normal = redis_keys.queue_name(model, Priority.NORMAL)
        queued = map(redis_keys.text, await self._redis.lrange(normal, 0, -1))
        waiting = [Queued(m, enqueued_at(m)) for m in queued]
        count = 0
        while True:
            tail = await self._redis.lindex(low, -1)
            raw = redis_keys.text(tail) if tail is not None else ""
            since = enqueued_at(raw) if raw else None
            if since is None or now - since <= self.max_wait:
                return count
            request_id, moved = retarget(raw, normal, Priority.NORMAL)
            at = place(waiting, since)
            pivot = waiting[at].message if at < len(waiting) else ""
            done = await self._promote(
                keys=[
                    low,
                    normal,
                    redis_keys.request_key(request_id),
                    redis_keys.live_key(low),
                    redis_keys.live_key(normal),
                ],
                args=[raw, moved, pivot, Priority.NORMAL.value, now, request_id],
            )
            if not done:  # a worker took it meanwhile: the next round looks again
                return count
            if done != 1:  # at the right end: whatever was right of `at` is gone
                del waiting[at:]
            waiting.insert(at, Queued(moved, since))
            count += 1
            log.info(
                "job=%s model=%s promoted low->normal waited_s=%.1f", request_id, model, now - since
            )
            if self._promotions is not None:
                self._promotions.labels(model=model).inc()
