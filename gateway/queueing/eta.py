"""When a queued request should start: from its position, the model's slots, when the
requests in them started, and the model's recent mean service time (`common.telemetry`).

Each slot is taken to serve one request per mean service time, in turn: a slot that is free
now serves the next request at once, a busy one once its request has run a mean service
time (at once if it ran longer already). The request at position p (1 = next) starts when
the p-th slot frees, in that order. No slot ready, or no request served lately: unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.registry import WorkerInfo, WorkerState
from gateway.monitoring import telemetry


@dataclass(frozen=True)
class Slots:
    total: int  # slots of the workers serving the model
    busy_since: list[float]  # when each running request started (epoch s)
    service_s: float | None  # the model's recent mean service time


def estimate_start(position: int, slots: Slots, now: float) -> float | None:
    """The epoch time the request at `position` should start; None if unknown."""
    if position < 1 or slots.total < 1 or slots.service_s is None:
        return None
    service = slots.service_s
    busy = sorted(slots.busy_since)[-slots.total :]  # the latest starts, if more than slots
    free_at = sorted([now] * (slots.total - len(busy)) + [max(now, s + service) for s in busy])
    turn, slot = divmod(position - 1, slots.total)
    return free_at[slot] + turn * service


async def read_slots(client: aioredis.Redis, model: str, workers: list[WorkerInfo]) -> Slots:
    """`model`'s slots now, from the live workers' entries (`gateway.cluster.read_workers`)."""
    total = sum(w.slots for w in workers if w.model == model and w.state is WorkerState.READY)
    running: Any = await client.zrange(redis_keys.running_key(model), 0, -1, withscores=True)
    service = await telemetry.mean_service_s(client, model) if total else None
    return Slots(total, [float(score) for _, score in running], service)
