"""`GET /metrics` (Prometheus text) and `GET /metrics/targets`: the live workers' own
/metrics endpoints in Prometheus's HTTP service-discovery format, so Prometheus scrapes
exactly the workers in the registry, and a worker that leaves drops out (its series go
stale and disappear)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from common import keys
from common.registry import WorkerInfo
from gateway.deps import State
from gateway.metrics import GatewayMetrics

router = APIRouter(tags=["management"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, state: State) -> Response:
    gm: GatewayMetrics = request.app.state.metrics
    await gm.refresh(state.redis, list(await state.catalog.all()), state.hub.active)
    return Response(gm.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/targets")
async def metrics_targets(state: State) -> list[dict[str, Any]]:
    members = sorted(map(str, await state.redis.smembers(keys.WORKERS)))
    entries = await state.redis.mget([keys.worker_key(m) for m in members]) if members else []
    out = []
    for raw in entries:
        if raw is None:
            continue
        info = WorkerInfo.model_validate_json(raw)
        if info.metrics_port:
            labels = {"worker": info.id, "model": info.model or ""}
            out.append({"targets": [f"{info.host}:{info.metrics_port}"], "labels": labels})
    return out
