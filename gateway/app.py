"""`create_app(settings)`: the gateway's FastAPI application."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from common.settings import Settings
from gateway import edge, errors
from gateway.monitoring.metrics import GatewayMetrics
from gateway.routes import (
    batches,
    chat,
    completions,
    embeddings,
    files,
    health,
    management,
    models,
    queue,
    requests,
    telemetry,
    ui,
    workers,
)
from gateway.routes import metrics as metrics_route
from gateway.state import GatewayState, redis_client
from gateway.tenancy.principals import KeysEpoch, authorize


def create_app(settings: Settings) -> FastAPI:
    # Built here, not in the lifespan, so the edge middlewares get them passed in. Neither
    # does any I/O before the first request.
    redis = redis_client(settings)
    metrics = GatewayMetrics()
    epoch = KeysEpoch()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.start(settings, redis, metrics, epoch)
        app.state.corral = state
        # Exempt what startup built (FastAPI, pydantic's schemas, Celery: hundreds of
        # thousands of objects) from the collector's full passes: each walked them all,
        # stalling every request in flight.
        gc.freeze()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="Corral", version="0.1.0", lifespan=lifespan, dependencies=[Depends(authorize)]
    )
    errors.install(app)
    # management before models: `GET /v1/models/{id:path}` would swallow /v1/models/status
    routers = (
        chat,
        completions,
        embeddings,
        management,
        workers,
        models,
        health,
        requests,
        queue,
        metrics_route,
        files,
        batches,
        telemetry,
        ui,
    )
    for module in routers:
        app.include_router(module.router)
    edge.install(app, settings, redis, epoch, metrics)
    return app
