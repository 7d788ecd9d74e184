"""`GET /health`: is this gateway up, can it reach Redis, how many workers are alive/ready.

It answers from the event loop alone: Redis's part is the last background reading
(`gateway.monitoring.liveness`), so the check never waits behind request work.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    seen = state.liveness.current()
    if seen.error is not None:
        return JSONResponse({"status": "error", "redis": False, "error": seen.error}, 503)
    # Without its pub/sub subscription the gateway cannot relay any answer: a load
    # balancer must route around it until it is back.
    subscribed = state.hub.ready
    serving = subscribed and not state.draining  # a load balancer must route around both
    return JSONResponse(
        {
            "status": "draining" if state.draining else "ok" if subscribed else "error",
            "redis": True,
            "pubsub": subscribed,
            "workers": seen.workers,
            "ready_workers": seen.ready_workers,
            "active_streams": state.hub.active,
        },
        200 if serving else 503,
    )
