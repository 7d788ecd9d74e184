"""Reading and writing request records from the gateway side: the record at enqueue,
its end when the gateway gives up on it, a queued request's position, queue statistics.

Positions and oldest waits are read from the queues themselves (kombu keeps each queue as
a Redis list, LPUSHed and BRPOPped, so the oldest message is at the right end), so they
are never out of step with what workers will actually take next.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.jobs import Job
from common.priority import Priority
from common.tracking import (
    RECORD_TTL_S,
    RequestRecord,
    RequestState,
)
from gateway import cluster
from gateway.queueing.task_message import task_body


def new_record(job: Job) -> RequestRecord:
    return RequestRecord(
        request_id=job.request_id,
        model=job.model,
        priority=job.priority,
        state=RequestState.QUEUED,
        stream=job.stream,
        channel=job.channel,
        enqueued_at=job.enqueued_at,
        deadline=job.deadline,
        owner=job.owner,
    )


# Where a request's message is in its queue, found inside Redis a hundred messages at a
# time: reading the whole queue out (each message carries its prompt) onto the gateway's
# event loop, on every poll of a queued request's record, grows with the prompts queued.
# KEYS: the queue. ARGV: the request id. Returns {index from the head or -1, length}.
FIND_LUA = """
local n = redis.call('LLEN', KEYS[1])
for start = 0, n - 1, 100 do
  local items = redis.call('LRANGE', KEYS[1], start, start + 99)
  for i = 1, #items do
    if string.find(items[i], ARGV[1], 1, true) then return {start + i - 1, n} end
  end
end
return {-1, n}
"""


class Tracker:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._find = client.register_script(FIND_LUA)

    @staticmethod
    def record_fields(job: Job) -> tuple[dict[str, str], int]:
        """A new record's hash fields and TTL (s). The gateway's enqueue script writes
        them (one round trip with the enqueue); the record's shape stays defined here."""
        return new_record(job).to_hash(), int(job.deadline - time.time()) + RECORD_TTL_S

    async def end_if_queued(
        self, request_id: str, state: RequestState, why: str, *, running_too: bool = False
    ) -> bool:
        """Mark a request that never started as ended (also a running one, with
        `running_too`: its worker is gone or its stream broke, and it may never write its
        end); False if it had ended already, or (without `running_too`) started."""
        key = redis_keys.request_key(request_id)
        current = await self._redis.hget(key, "state")
        allowed = {RequestState.QUEUED.value}
        if running_too:
            allowed.add(RequestState.RUNNING.value)
        if current not in allowed:
            return False
        fields: dict[Any, Any] = {"state": state, "finished_at": time.time(), "error": why}
        await self._redis.hset(key, mapping=fields)
        return True

    async def get(self, request_id: str) -> RequestRecord | None:
        raw = await self._redis.hgetall(redis_keys.request_key(request_id))
        if not raw:
            return None
        record = RequestRecord.from_hash(raw)
        if record.state is RequestState.QUEUED:
            record.position = await self.position(record)
        return record

    async def position(self, record: RequestRecord) -> int | None:
        """1 = the next of its model's requests to start; None if not found in its queue."""
        ahead = 0
        for priority in Priority:
            queue = redis_keys.queue_name(record.model, priority)
            if priority is not record.priority:
                if priority.rank < record.priority.rank:
                    ahead += await self._redis.llen(queue)
                continue
            index, length = await self._find(keys=[queue], args=[record.request_id])
            if index >= 0:  # pushed at the head, taken from the tail
                return ahead + (length - 1 - index) + 1
        return None

    async def queue_stats(self, models: list[str]) -> dict[str, Any]:
        """Per model and priority: depth, oldest wait (s), and requests running."""
        now = time.time()
        depths = await cluster.queue_depths(self._redis, models)
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            for priority in Priority:
                pipe.lindex(redis_keys.queue_name(model, priority), -1)
        oldest = iter(await pipe.execute())
        out: dict[str, Any] = {}
        for model in models:
            per: dict[str, Any] = {}
            for priority in Priority:
                head = next(oldest)
                enqueued = enqueued_at(str(head)) if head else None
                per[priority.value] = {
                    "queue": redis_keys.queue_name(model, priority),
                    "depth": depths[model].get(priority.value, 0),
                    "oldest_wait_s": round(now - enqueued, 3) if enqueued else None,
                }
            live, _ = await cluster.running(self._redis, model)
            out[model] = {"priorities": per, "running": len(live)}
        return out


def enqueued_at(message: str) -> float | None:
    """The `enqueued_at` of a queued Celery message, as kombu's Redis transport stores it
    (JSON envelope, base64 body holding `[args, kwargs, embed]`)."""
    try:
        args = task_body(json.loads(message))[0]
        return float(args[0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
