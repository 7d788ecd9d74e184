"""Model management (names kept from RouterModelCustom so its users can switch):
`GET /v1/models/status`, `GET /v1/models/status/stream`, `GET /v1/models/failed`,
`POST /v1/models/load`, `POST /v1/models/eject`, `GET /v1/models/{alias}/status`,
`POST /v1/models/{alias}/reset`.

Registered before `GET /v1/models/{id:path}`, which would otherwise swallow these paths.
Tagged `management`: admin-only once API keys exist (`gateway.tenancy.principals` opens only routes
tagged for users), but for the status stream, which a user key may watch too (the status
page, read-only): it sees the models it may use, its own requests and batches.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from common.errors import CorralError
from common.registry import ModelEvent
from common.wire import RequestDefaults
from gateway.cluster import queue_depths
from gateway.deps import State
from gateway.monitoring import telemetry
from gateway.monitoring.model_status import model_status
from gateway.monitoring.overview import for_caller, full_status, visible_status
from gateway.placement.policy import Outcome, plan_error, plan_summary
from gateway.state import GatewayState
from gateway.tenancy.ownership import Caller, CallerDep
from gateway.tenancy.principals import STATUS_TAG, principal_of

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


@router.get("/v1/models/status")
async def models_status(state: State) -> dict[str, Any]:
    return await full_status(state)


@router.get("/v1/models/status/stream", response_model=None, tags=[STATUS_TAG])
async def models_status_stream(
    request: Request, state: State, caller: CallerDep, cluster: bool = False
) -> StreamingResponse:
    """SSE: `full_status` once, then a `model_update` per change (off -> loading -> ready ->
    unloading / failed), and a `heartbeat` comment-like event when quiet.

    With `?cluster=true` (the status page), also a `cluster` event (workers, queues, recent
    requests, batches: `gateway.monitoring.overview`) at once, every second while it
    changes, and right after model updates; and an `error` event while Redis cannot be read.
    A user key sees the models it may use, and only its own requests and batches."""
    source, leave = await _subscribe(state, cluster)  # before the snapshot: nothing missed
    viewer = _viewer(request)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield _sse("full_status", visible_status(await full_status(state), caller))
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):  # wait_for may eat a cancel
                        item = await source.get()
                except TimeoutError:
                    yield _sse("heartbeat", {})
                    continue
                if item is None:
                    return
                if (out := _event(item, caller, viewer)) is not None:
                    yield out
        finally:
            leave()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _subscribe(
    state: GatewayState, cluster: bool
) -> tuple[asyncio.Queue[Any], Callable[[], None]]:
    """The model events (and with `cluster`, the board's snapshots), and how to leave."""
    if cluster:
        items = await state.board.watch()
        return items, functools.partial(state.board.leave, items)
    events = await state.feed.listen()
    return events, functools.partial(state.feed.leave, events)


def _event(item: Any, caller: Caller, viewer: dict[str, Any]) -> bytes | None:
    """One SSE event for what the feed (a `ModelEvent`) or the board (`(kind, data)`,
    `gateway.monitoring.board`) gave; None if `caller` may not see it."""
    kind, data = ("model_update", item) if isinstance(item, ModelEvent) else item
    data = cast(Any, data)
    if kind == "model_update":
        return _sse(kind, _update(data)) if caller.allows_model(data.model) else None
    if kind == "cluster":
        return _sse(kind, {**for_caller(data, caller), "viewer": viewer})
    err = CorralError(f"The gateway cannot read Redis: {data['message']}", code=data["code"])
    return _sse("error", err.envelope())


def _viewer(request: Request) -> dict[str, Any]:
    """Who watches: the page offers admin actions to `admin` and `open` only."""
    principal = principal_of(request)
    if principal is None:
        return {"role": "open", "key": None}
    return {"role": principal.role.value, "key": principal.key.name if principal.key else None}


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
    out["speed"] = (await telemetry.speeds(state.redis, [alias]))[alias]
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
