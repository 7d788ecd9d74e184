"""`GET /v1/workers` and `GET /vram`: every live worker with its budget, memory used, model,
state and slots (what `corral status` prints). Tagged `management` (admin-only with keys)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.cluster import worker_summary
from gateway.deps import State
from gateway.monitoring.model_status import vram

router = APIRouter(tags=["management"])


@router.get("/v1/workers")
async def list_workers(state: State) -> dict[str, Any]:
    view = await state.placer.view(0)
    return {"object": "list", "data": [worker_summary(w) for w in view.workers]}


@router.get("/vram")
async def get_vram(state: State) -> dict[str, Any]:
    return vram(await state.placer.view(0))
