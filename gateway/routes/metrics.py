"""`GET /metrics` (Prometheus text) and `GET /metrics/targets`: the live workers' own
/metrics endpoints in Prometheus's HTTP service-discovery format, so Prometheus scrapes
exactly the workers in the registry, and a worker that leaves drops out (its series go
stale and disappear). Each target is the address the worker's /metrics listens on
(`WorkerInfo.metrics_target`), not its host name, which may resolve elsewhere (Debian maps
it to 127.0.1.1, where a worker listening on 127.0.0.1 is not)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.cluster import queue_depths, read_workers
from gateway.deps import State

router = APIRouter(tags=["management"])


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Queue depths, workers and open streams are read now, so they are never stale."""
    depths = await queue_depths(state.redis, list(await state.catalog.all()))
    state.metrics.refresh(await read_workers(state.redis), depths, state.hub.active)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/targets")
async def metrics_targets(state: State) -> list[dict[str, Any]]:
    out = []
    for info in await read_workers(state.redis):
        target = info.metrics_target()
        if target:
            labels = {"worker": info.id, "model": info.model or ""}
            out.append({"targets": [target], "labels": labels})
    return out
