"""`GET /v1/telemetry`: per model, over the last minute and the last hour, requests ended
(done, errors, cancelled), tokens, llama-server's prompt and generation tokens/s, mean
service time, and time to first token and queue wait percentiles — the same on every
gateway, read from the buckets workers write (`common.telemetry`). Admin-only with keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import State
from gateway.monitoring import telemetry

router = APIRouter(tags=["management"])


@router.get("/v1/telemetry")
async def get_telemetry(state: State) -> dict[str, Any]:
    models = list(await state.catalog.all())
    return {
        "object": "telemetry",
        "windows_s": {"last_minute": 60, "last_hour": 3600},
        "models": await telemetry.report(state.redis, models),
    }
