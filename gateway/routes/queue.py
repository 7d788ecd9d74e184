"""`GET /v1/queue/stats`: per model and priority, queue depth and oldest wait; and how many
requests run on live workers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/v1/queue/stats")
async def queue_stats(state: State) -> dict[str, Any]:
    models = list(await state.catalog.all())
    return {"object": "queue.stats", "models": await state.dispatcher.tracker.queue_stats(models)}
