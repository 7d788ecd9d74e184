"""The affinity queues nobody consumes any more, given back to their shared queues.

A replica that unloads its model gives its own affinity queues back itself
(`workers.models.affinity`), and each request waiting in one is moved by its gateway's
timer after `affinity_wait` (`gateway.queueing.affinity`). What neither reaches, say a
replica killed with requests of a gateway that stopped too, one gateway moves here: the
queues of every replica that is gone, or serves another model now, are emptied into the
shared queue of their model and priority and forgotten (with kombu's binding keys, which
the replica's consumer declared for them). One gateway at a time (`gateway.leader`).
"""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis

from common import redis_keys
from common.affinity import GIVE_BACK_LUA
from common.priority import Priority
from common.registry import WorkerState
from gateway.cluster import read_workers
from gateway.leader import LeaderDuty, LeaderLock

log = logging.getLogger(__name__)

SWEEP_S = 2.0
LEADER_TTL_S = 10.0


class AffinitySweeper(LeaderDuty):
    name = "affinity sweep"

    def __init__(self, client: aioredis.Redis, holder: str, interval: float = SWEEP_S) -> None:
        self._redis = client
        self.interval = interval
        self._leader = LeaderLock(client, redis_keys.AFFINITY_LEADER, holder, LEADER_TTL_S)
        self._give_back = client.register_script(GIVE_BACK_LUA)

    async def tick(self) -> int:
        """One look at every registered affinity queue; how many requests moved."""
        raw = await self._redis.hgetall(redis_keys.AFFINITY_QUEUES)
        if not raw:
            return 0
        workers = await read_workers(self._redis)
        serving = {(w.id, w.model) for w in workers if w.state is WorkerState.READY}
        moved = 0
        for field, value in raw.items():
            queue = redis_keys.text(field)
            meta = json.loads(value)
            if (meta["worker"], meta["alias"]) in serving:
                continue
            shared = redis_keys.queue_name(meta["alias"], Priority(meta["priority"]))
            n = int(await self._give_back(keys=[queue, shared]))
            pipe = self._redis.pipeline(transaction=False)
            pipe.hdel(redis_keys.AFFINITY_QUEUES, queue)
            pipe.delete(*redis_keys.kombu_bindings(queue))
            await pipe.execute()
            moved += n
            log.info(
                "affinity queue %s dropped: worker=%s no longer serves %s; %d request(s) "
                "moved to %s",
                queue,
                meta["worker"],
                meta["alias"],
                n,
                shared,
            )
        return moved
