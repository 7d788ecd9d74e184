"""`GET /health`: is this gateway up, can it reach Redis, how many workers are alive/ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from common import keys
from common.registry import WorkerInfo, WorkerState
from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    try:
        members = sorted(map(str, await state.redis.smembers(keys.WORKERS)))
        entries = await state.redis.mget([keys.worker_key(m) for m in members]) if members else []
    except RedisError as exc:
        return JSONResponse({"status": "error", "redis": False, "error": repr(exc)}, 503)
    alive = [WorkerInfo.model_validate_json(e) for e in entries if e is not None]
    # Without its pub/sub subscription the gateway cannot relay any answer: a load
    # balancer must route around it until it is back.
    subscribed = state.hub.ready
    return JSONResponse(
        {
            "status": "ok" if subscribed else "error",
            "redis": True,
            "pubsub": subscribed,
            "workers": len(alive),
            "ready_workers": sum(w.state is WorkerState.READY for w in alive),
            "active_streams": state.hub.active,
        },
        200 if subscribed else 503,
    )
