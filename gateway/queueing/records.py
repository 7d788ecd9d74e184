"""Reading and writing request records from the gateway side: the record at enqueue,
its end when the gateway gives up on it, a queued request's position and estimated start,
queue statistics.

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
from common.registry import WorkerInfo
from common.tracking import (
    RECORD_TTL_S,
    RequestRecord,
    RequestState,
)
from gateway import cluster
from gateway.queueing import eta
from gateway.queueing.task_message import task_body


def new_record(job: Job, client_id: str | None = None) -> RequestRecord:
    return RequestRecord(
        client_request_id=client_id,
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


# Where requests' messages are in their model's queues, found inside Redis a hundred
# messages at a time: reading a queue out (each message carries its prompt) onto the
# gateway's event loop grows with the prompts queued. One pass over each queue finds them
# all. KEYS: the model's interactive queues, highest priority first. ARGV: pairs of a
# request id and the number of the queue it waits in (1 = KEYS[1]). Returns each
# request's position (1 = the next of the model's requests to start; every request in a
# higher queue is ahead), or 0 if it is not queued.
POSITIONS_LUA = """
local found, left, ahead = {}, 0, 0
for i = 1, #ARGV, 2 do found[#found + 1] = 0; left = left + 1 end
for q = 1, #KEYS do
  local n = redis.call('LLEN', KEYS[q])
  local mine = {}
  for i = 1, #ARGV, 2 do
    if tonumber(ARGV[i + 1]) == q then mine[#mine + 1] = (i + 1) / 2 end
  end
  local start = 0
  while #mine > 0 and start < n do
    local items = redis.call('LRANGE', KEYS[q], start, start + 99)
    for j = 1, #items do
      for m = #mine, 1, -1 do
        local k = mine[m]
        if string.find(items[j], ARGV[2 * k - 1], 1, true) then
          found[k] = ahead + n - (start + j - 1)  -- pushed at the head, taken from the tail
          table.remove(mine, m)
        end
      end
    end
    start = start + 100
  end
  ahead = ahead + n
end
return found
"""


class Tracker:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._positions = client.register_script(POSITIONS_LUA)

    @staticmethod
    def record_fields(job: Job, client_id: str | None = None) -> tuple[dict[str, str], int]:
        """A new record's hash fields and TTL (s). The gateway's enqueue script writes
        them (one round trip with the enqueue); the record's shape stays defined here."""
        ttl = int(job.deadline - time.time()) + RECORD_TTL_S
        return new_record(job, client_id).to_hash(), ttl

    async def find(self, some_id: str, owner: str | None) -> RequestRecord | None:
        """A record by our request id, or by the client's own id (its `owner`'s)."""
        record = await self.get(some_id)
        if record is not None:
            return record
        ours = await self._redis.get(redis_keys.client_request_key(owner, some_id))
        return await self.get(str(ours)) if ours else None

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
            workers = await cluster.read_workers(self._redis)
            await self.place([record], workers)
        return record

    async def place(self, records: list[RequestRecord], workers: list[WorkerInfo]) -> None:
        """Fill in each queued record's position and estimated start (`gateway.queueing.eta`):
        one script per model finds them all in its queues."""
        by_queues: dict[tuple[str, str | None], list[RequestRecord]] = {}
        for record in records:
            if record.state is RequestState.QUEUED:
                replica = record.affinity_worker if record.affinity in ("hit", "new") else None
                by_queues.setdefault((record.model, replica), []).append(record)
        now = time.time()
        for (model, replica), queued in by_queues.items():
            keys, args = _position_args(model, replica, queued)
            found = await self._positions(keys=keys, args=args)
            slots = await eta.read_slots(self._redis, model, workers)
            for record, position in zip(queued, found, strict=True):
                record.position = int(position) or None
                if record.position is not None:
                    record.estimated_start_at = eta.estimate_start(record.position, slots, now)

    async def queue_stats(self, models: list[str]) -> dict[str, Any]:
        """Per model and priority: depth, oldest wait (s), and requests running."""
        now = time.time()
        depths = await cluster.queue_depths(self._redis, models)
        queues = await self._queues(models)
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            for priority in Priority:
                for queue in queues[model, priority]:
                    pipe.lindex(queue, -1)
        heads = iter(await pipe.execute())
        out: dict[str, Any] = {}
        for model in models:
            per: dict[str, Any] = {}
            for priority in Priority:
                tails = [next(heads) for _ in queues[model, priority]]
                found = [t for t in (enqueued_at(str(h)) for h in tails if h) if t is not None]
                enqueued = min(found, default=None)
                per[priority.value] = {
                    "queue": redis_keys.queue_name(model, priority),
                    "depth": depths[model].get(priority.value, 0),
                    "oldest_wait_s": round(now - enqueued, 3) if enqueued else None,
                }
            live, _ = await cluster.running(self._redis, model)
            out[model] = {"priorities": per, "running": len(live)}
        return out

    async def _queues(self, models: list[str]) -> dict[tuple[str, Priority], list[str]]:
        """Each model's queues of each priority: the shared one, then its replicas'
        affinity queues (registered in `redis_keys.AFFINITY_QUEUES`), where a request can
        wait up to its `affinity_wait`."""
        out = {(m, p): [redis_keys.queue_name(m, p)] for m in models for p in Priority}
        for queue, raw in (await self._redis.hgetall(redis_keys.AFFINITY_QUEUES)).items():
            try:
                meta = json.loads(raw)
                key = (str(meta["alias"]), Priority(meta["priority"]))
            except (ValueError, KeyError, TypeError):
                continue
            if key in out:
                out[key].append(redis_keys.text(queue))
        return out


def _position_args(
    model: str, replica: str | None, queued: list[RequestRecord]
) -> tuple[list[str], list[Any]]:
    """The queues in the order a replica takes from them, and each request's own queue
    (`POSITIONS_LUA`): the shared ones; for requests waiting in `replica`'s affinity
    queues, each of its own queues before the shared one of the same priority."""
    args: list[Any] = []
    if replica is None:
        for record in queued:
            args += (record.request_id, record.priority.rank + 1)
        return redis_keys.model_queues(model), args
    keys = []
    for p in sorted(Priority, key=lambda p: p.rank):
        keys += [redis_keys.affinity_queue(model, p, replica), redis_keys.queue_name(model, p)]
    for record in queued:
        args += (record.request_id, 2 * record.priority.rank + 1)
    return keys, args


def enqueued_at(message: str) -> float | None:
    """The `enqueued_at` of a queued Celery message, as kombu's Redis transport stores it
    (JSON envelope, base64 body holding `[args, kwargs, embed]`)."""
    try:
        args = task_body(json.loads(message))[0]
        return float(args[0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
