"""Prefix affinity on the queue: a request goes to the replica that holds its prompt cache,
and never waits on it for long.

With two or more ready replicas of a model (and `affinity` on), the enqueue script
(`gateway.queueing.dispatch`) pushes a request that has an affinity key
(`common.affinity`) onto the own queue of its priority (`redis_keys.affinity_queue`) of
the replica that ran the key last ("hit"), if it is ready. A key no ready replica ran
("new": nothing of it is cached anywhere) goes to the shared queue, where whichever
replica is free first takes it and becomes the key's: pinning it to a replica chosen by
hashing gained no cache and, on prompts that share nothing, left a free replica idle
while another queued (`benchmarks/README.md`). The message itself is routed to the
shared queue, so a copy kombu restores or a worker sends back lands there.

Each replica consumes its own queue of a priority just before the shared one (the names
sort so), so strict priority holds: every high request is taken before any normal one.
Nothing is lost to a busy or dead replica: `Spills` gives each such request
`affinity_wait` seconds, then moves it from the replica's queue to the shared one in one
script ("spill"), where any replica takes it; a request the replica took meanwhile is
not in its list any more, and stays where it is. Replicas that unload give their queues
back themselves (`workers.models.affinity`); `AffinitySweeper` moves what is left in the
queues of replicas that left or serve another model since.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from common import redis_keys
from common.jobs import Job
from common.settings import ModelConfig
from gateway.aio import cancel_and_wait

log = logging.getLogger(__name__)

SPILL_RETRY_S = 1.0  # a spill that found Redis away is tried again after this

# KEYS: the replica's affinity queue, the shared queue, the request's record. ARGV: the
# message. Moves the message (if no replica took it yet) to the end of the shared queue
# that is served next: it has waited already. Returns 1 if it moved.
SPILL_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], 'affinity', 'spill') end
return 1
"""


@dataclass(frozen=True)
class Preference:
    """Where a request with an affinity key may go: the ready replicas, and how long the
    one that holds its key has to take it."""

    replicas: tuple[str, ...]
    wait: float


def preference(job: Job, model: ModelConfig, ready: list[str]) -> Preference | None:
    """The request's preference, or None for the shared queue alone: no key, affinity off
    for its model, fewer than two replicas to choose from, or a batch item."""
    if job.affinity is None or job.batch_id is not None or not model.affinity:
        return None
    if len(ready) < 2:
        return None
    return Preference(tuple(ready), model.affinity_wait)


class Spills:
    """The timers of one gateway's affinity-queued requests: each moves its request to the
    shared queue once its wait is over, unless a replica took it."""

    def __init__(self, client: aioredis.Redis, counter: Counter | None = None) -> None:
        self._redis = client
        self._spill = client.register_script(SPILL_LUA)
        self._counter = counter  # `corral_affinity_total`, result="spill"
        self._tasks: set[asyncio.Task[None]] = set()

    def after(self, wait: float, job: Job, worker: str, entry: str) -> None:
        """Spill `entry` (queued for `worker`) in `wait` seconds if it is still there."""
        task = asyncio.create_task(self._later(wait, job, worker, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, wait: float, job: Job, worker: str, entry: str) -> None:
        await asyncio.sleep(wait)
        queue = redis_keys.affinity_queue(job.model, job.priority, worker)
        shared = redis_keys.queue_name(job.model, job.priority)
        keys = [queue, shared, redis_keys.request_key(job.request_id)]
        while not job.expired():
            try:
                moved = await self._spill(keys=keys, args=[entry])
            except RedisError as exc:
                log.warning("job=%s spill deferred, Redis unavailable: %r", job.request_id, exc)
                await asyncio.sleep(SPILL_RETRY_S)
                continue
            if moved:
                log.info(
                    "job=%s model=%s spilled to the shared queue: %s did not take it in %.1f s",
                    job.request_id,
                    job.model,
                    worker,
                    wait,
                )
                if self._counter is not None:
                    self._counter.labels(model=job.model, result="spill").inc()
            return

    async def stop(self) -> None:
        """Cancel the timers. What they leave behind is taken by its replica when it is
        free, or moved by the sweeper once that replica has left or serves another model."""
        for task in list(self._tasks):  # a timer may be in a Redis command: cancel until done
            await cancel_and_wait(task)
