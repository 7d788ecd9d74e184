"""`GET /health`: is this gateway up, can it reach Redis, how many workers are alive."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from common import keys
from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    try:
        members = await state.redis.smembers(keys.WORKERS)
        alive = 0
        if members:
            pipe = state.redis.pipeline(transaction=False)
            for m in members:
                pipe.exists(keys.worker_key(str(m)))
            alive = sum(await pipe.execute())
    except RedisError as exc:
        return JSONResponse({"status": "error", "redis": False, "error": repr(exc)}, 503)
    return JSONResponse(
        {"status": "ok", "redis": True, "workers": alive, "active_streams": state.hub.active}
    )
