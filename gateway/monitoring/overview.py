"""What the status page shows, read from Redis in one go: the models' status (with their
recent speeds), the live workers, every model's queues, the latest requests (a queued one
with its position and estimated start) and batches.

`overview` is the admin's view, built once per tick for every page watching
(`gateway.monitoring.board`); `for_caller` cuts it down to what a user key may see: the
models it may use, their workers and queues, its own requests and batches.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from common import redis_keys
from common.tracking import RequestRecord
from gateway.cluster import View, queue_depths, worker_summary
from gateway.monitoring import telemetry
from gateway.monitoring.model_status import count_by_status, model_status
from gateway.tenancy.ownership import Caller

if TYPE_CHECKING:
    from gateway.state import GatewayState

REQUESTS_SHOWN = 100  # the latest requests read (a user sees its own among them)
BATCHES_SHOWN = 20


async def full_status(state: GatewayState, view: View | None = None) -> dict[str, Any]:
    """`GET /v1/models/status`: every model's status, its recent speed, and a summary."""
    models = await state.catalog.all()
    view = view or await state.placer.view(0)
    depths = await queue_depths(state.redis, list(models))
    speeds = await telemetry.speeds(state.redis, list(models))
    statuses = {
        alias: {
            **model_status(alias, m, view, depths[alias], state.settings.preloaded(alias, m)),
            "speed": speeds[alias],
        }
        for alias, m in models.items()
    }
    return {"models": statuses, "summary": count_by_status(list(statuses.values()))}


async def overview(state: GatewayState) -> dict[str, Any]:
    view = await state.placer.view(0)
    status = await full_status(state, view)
    models = list(status["models"])
    queues = await state.dispatcher.tracker.queue_stats(models)
    records = await recent_requests(state)
    await state.dispatcher.tracker.place(records, view.workers)
    batches, _ = await state.batches.store.list(None, BATCHES_SHOWN)
    return {
        **status,
        "now": time.time(),  # the page's clock: its relative times follow the gateway's
        "workers": [worker_summary(w) for w in view.workers],
        "queues": queues,
        "requests": [r.model_dump(mode="json", exclude={"channel"}) for r in records],
        "batches": [{**b.model_dump(mode="json"), "owner": b.owner} for b in batches],
    }


async def recent_requests(state: GatewayState) -> list[RequestRecord]:
    """The latest requests, newest first (those whose record expired are gone)."""
    raw = await state.redis.lrange(redis_keys.RECENT_REQUESTS, 0, REQUESTS_SHOWN - 1)
    ids = list(dict.fromkeys(redis_keys.text(i) for i in raw))  # a resubmission: listed twice
    pipe = state.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hgetall(redis_keys.request_key(request_id))
    return [RequestRecord.from_hash(raw) for raw in await pipe.execute() if raw]


def visible_status(status: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """What `caller` may see of `full_status`: the models it may use."""
    if caller.key is None:
        return status
    models = {a: m for a, m in status["models"].items() if caller.allows_model(a)}
    return {**status, "models": models, "summary": count_by_status(list(models.values()))}


def for_caller(snapshot: dict[str, Any], caller: Caller) -> dict[str, Any]:
    """What `caller` may see of `snapshot`; owners' key ids are never shown."""
    out = visible_status(snapshot, caller)
    if caller.key is not None:
        allowed = set(out["models"])
        out["workers"] = [w for w in snapshot["workers"] if w["model"] in allowed]
        out["queues"] = {a: q for a, q in snapshot["queues"].items() if a in allowed}
        out["requests"] = [r for r in snapshot["requests"] if caller.sees(r.get("owner"))]
        out["batches"] = [b for b in snapshot["batches"] if caller.sees(b.get("owner"))]
    out["requests"] = [_without_owner(r) for r in out["requests"]]
    out["batches"] = [_without_owner(b) for b in out["batches"]]
    return out


def _without_owner(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "owner"}
