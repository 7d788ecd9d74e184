"""A replica's own affinity queues (`gateway.queueing.affinity`), seen from its model manager.

A replica serving a model consumes, besides the model's shared queues, one queue of its
own per priority, where gateways send the requests whose prompt it likely holds in cache
(`redis_keys.consumed_queues`). Once it serves the model it registers those queues, so a
gateway's sweeper can empty them if the replica dies (`gateway.queueing.affinity_sweep`);
once it stops consuming them (an unload, a crashed child, a stop) it gives what is left
back to the shared queues at once, rather than leave each request to its gateway's
`affinity_wait`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from common import redis_keys
from common.affinity import GIVE_BACK_LUA
from common.priority import Priority

log = logging.getLogger(__name__)

INTERACTIVE = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


def register(client: redis.Redis, alias: str, worker_id: str) -> None:
    """Make this replica's affinity queues of `alias` known to the sweeper."""
    mapping: dict[Any, Any] = {
        redis_keys.affinity_queue(alias, p, worker_id): json.dumps(
            {"alias": alias, "priority": p.value, "worker": worker_id}
        )
        for p in INTERACTIVE
    }
    try:
        client.hset(redis_keys.AFFINITY_QUEUES, mapping=mapping)
    except redis.RedisError as exc:  # the gateways' timers still move what waits here
        log.warning("worker=%s model=%s affinity queues not registered: %r", worker_id, alias, exc)


def give_back(client: redis.Redis, alias: str, worker_id: str) -> int:
    """Move every request still in this replica's affinity queues of `alias` to the shared
    queue of its priority, and forget the queues; how many moved. Call once the replica
    no longer consumes them."""
    moved = 0
    try:
        for p in INTERACTIVE:
            queue = redis_keys.affinity_queue(alias, p, worker_id)
            shared = redis_keys.queue_name(alias, p)
            moved += int(client.eval(GIVE_BACK_LUA, 2, queue, shared))
            client.hdel(redis_keys.AFFINITY_QUEUES, queue)
            client.delete(*redis_keys.kombu_bindings(queue))  # its consumer declared them
    except redis.RedisError as exc:  # the sweeper moves them once it sees us gone
        log.warning("worker=%s model=%s affinity queues not given back: %r", worker_id, alias, exc)
        return moved
    if moved:
        log.info(
            "worker=%s model=%s gave %d affinity-queued request(s) back to the shared queues",
            worker_id,
            alias,
            moved,
        )
    return moved
