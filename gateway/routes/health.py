"""`GET /health`: is this gateway up, can it reach Redis, how many workers are alive/ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from common.registry import WorkerState
from gateway.cluster import read_workers
from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    try:
        alive = await read_workers(state.redis)
    except RedisError as exc:
        return JSONResponse({"status": "error", "redis": False, "error": repr(exc)}, 503)
    # Without its pub/sub subscription the gateway cannot relay any answer: a load
    # balancer must route around it until it is back.
    subscribed = state.hub.ready
    serving = subscribed and not state.draining  # a load balancer must route around both
    return JSONResponse(
        {
            "status": "draining" if state.draining else "ok" if subscribed else "error",
            "redis": True,
            "pubsub": subscribed,
            "workers": len(alive),
            "ready_workers": sum(w.state is WorkerState.READY for w in alive),
            "active_streams": state.hub.active,
        },
        200 if serving else 503,
    )
