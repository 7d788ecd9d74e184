"""Model management (names kept from RouterModelCustom so its users can switch):
`GET /v1/models/status`, `GET /v1/models/status/stream`, `GET /v1/models/failed`,
`POST /v1/models/load`, `POST /v1/models/eject`, `GET /v1/models/{alias}/status`,
`POST /v1/models/{alias}/reset`.

Registered before `GET /v1/models/{id:path}`, which would otherwise swallow these paths.
Tagged `management`: admin-only once API keys exist (`gateway.tenancy.principals` opens only routes
tagged for users).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from common.registry import ModelEvent
from common.wire import RequestDefaults
from gateway.cluster import queue_depths
from gateway.deps import State
from gateway.monitoring.model_status import count_by_status, model_status
from gateway.placement.policy import Outcome, plan_error, plan_summary
from gateway.state import GatewayState

router = APIRouter(tags=["management"])

KEEPALIVE_S = 15.0


class LoadBody(BaseModel):
    model: str = Field(min_length=1)
    replicas: int | None = Field(default=None, ge=1, le=256)


class EjectBody(BaseModel):
    model: str = Field(min_length=1)


@router.post("/v1/models/scan")
async def models_scan(state: State) -> dict[str, Any]:
    """Read `models_dir` again now (it is also read every few seconds when it changes)."""
    changed = state.catalog.rescan()
    await state.catalog.announce()
    return {"changed": changed, "models": sorted(state.catalog.own)}


async def full_status(state: GatewayState) -> dict[str, Any]:
    models = await state.catalog.all()
    view = await state.placer.view(0)
    depths = await queue_depths(state.redis, list(models))
    statuses = {
        alias: model_status(alias, m, view, depths[alias], state.settings.preloaded(alias, m))
        for alias, m in models.items()
    }
    return {"models": statuses, "summary": count_by_status(list(statuses.values()))}


@router.get("/v1/models/status")
async def models_status(state: State) -> dict[str, Any]:
    return await full_status(state)


@router.get("/v1/models/status/stream", response_model=None)
async def models_status_stream(state: State) -> StreamingResponse:
    """SSE: `full_status` once, then a `model_update` per change (off -> loading -> ready ->
    unloading / failed), and a `heartbeat` comment-like event when quiet."""
    events = await state.feed.listen()  # subscribed before the snapshot: nothing is missed

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield _sse("full_status", await full_status(state))
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):  # wait_for may eat a cancel
                        event = await events.get()
                except TimeoutError:
                    yield _sse("heartbeat", {})
                    continue
                if event is None:
                    return
                yield _sse("model_update", _update(event))
        finally:
            state.feed.leave(events)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/v1/models/failed")
async def models_failed(state: State) -> dict[str, Any]:
    """Every failure on record: per worker (`detail`: llama-server's own last lines), and
    models found unloadable before any worker tried (`worker`: null)."""
    view = await state.placer.view(0)
    failed = [
        {"model": alias, "worker": w.id, "error": error, "detail": w.failed_detail.get(alias)}
        for w in view.workers
        for alias, error in sorted(w.failed.items())
    ]
    failed += [
        {"model": alias, "worker": None, "error": why, "detail": why}
        for alias, why in sorted(view.broken.items())
    ]
    return {"failed_models": failed}


@router.post("/v1/models/load", status_code=202)
async def models_load(body: LoadBody, state: State) -> dict[str, Any]:
    """Place the model (`replicas` copies) and return at once; follow it on the status."""
    plan = await state.placer.load(body.model, body.replicas)
    if plan.outcome in (Outcome.NO_CAPACITY, Outcome.FAILED):
        raise plan_error(body.model, plan)
    status = "ready" if plan.outcome is Outcome.SERVING else "loading"
    if plan.outcome is Outcome.WAIT:
        status = "waiting"
    return {"status": status, "model": body.model, "placement": plan_summary(plan)}


@router.post("/v1/models/eject")
async def models_eject(body: EjectBody, state: State) -> dict[str, Any]:
    workers = await state.placer.eject(body.model)
    if not workers:
        return {
            "status": "not_found",
            "model_ejected": None,
            "workers": [],
            "message": f"Model {body.model!r} is not loaded.",
        }
    message = f"Model {body.model!r} is unloading on {len(workers)} worker(s)."
    return {
        "status": "success",
        "model_ejected": body.model,
        "workers": workers,
        "message": message,
    }


@router.get("/v1/models/{alias:path}/status")
async def model_status_one(alias: str, state: State) -> dict[str, Any]:
    model = await state.catalog.get(alias)  # 404 if unknown
    view = await state.placer.view(0)
    depths = await queue_depths(state.redis, [alias])
    out = model_status(alias, model, view, depths[alias], state.settings.preloaded(alias, model))
    records = await state.placer.needs.records(alias)  # per profile: estimate vs measured
    out["memory"] = {prof: rec.model_dump() for prof, rec in sorted(records.items())}
    return out


@router.get("/v1/models/{alias:path}/defaults")
async def model_defaults(alias: str, state: State) -> dict[str, Any]:
    """The request defaults a request for `alias` gets (its config's, and those set here)."""
    return {"model": alias, "defaults": (await state.catalog.get(alias)).defaults}


@router.post("/v1/models/{alias:path}/defaults")
async def set_model_defaults(alias: str, body: RequestDefaults, state: State) -> dict[str, Any]:
    """Set request defaults at run time, over the config's ({}: back to the config's).
    Sampling fields only; a request's own values always win."""
    model = await state.catalog.set_defaults(alias, body.fields())
    return {"model": alias, "defaults": model.defaults}


@router.delete("/v1/models/{alias:path}")
async def model_remove(alias: str, state: State) -> dict[str, Any]:
    """Forget a model announced by an earlier config (`corral models rm`); one that is
    loaded is ejected first."""
    await state.catalog.remove(alias)
    ejected = await state.placer.eject(alias, known=False)
    return {"status": "removed", "model": alias, "ejected_from": ejected}


@router.post("/v1/models/{alias:path}/reset")
async def model_reset(alias: str, state: State) -> dict[str, Any]:
    cleared = await state.placer.reset(alias)
    if not cleared:
        return {
            "status": "not_found",
            "model": alias,
            "message": f"Model {alias!r} has no failure record.",
        }
    return {
        "status": "success",
        "model": alias,
        "workers": sorted(cleared),
        "previous_error": next(iter(cleared.values())),
        "message": f"Failure status cleared on {len(cleared)} worker(s).",
    }


def _update(event: ModelEvent) -> dict[str, Any]:
    return {
        "alias": event.model,
        "status": event.state.value,
        "worker": event.worker,
        "error": event.error,
        "at": event.at,
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
