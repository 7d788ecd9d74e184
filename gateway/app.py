"""`create_app(settings)`: the gateway's FastAPI application."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from common.settings import Settings
from gateway import errors, hardening
from gateway.auth import authorize
from gateway.middleware import RequestIdMiddleware
from gateway.routes import (
    batches,
    chat,
    completions,
    embeddings,
    files,
    health,
    management,
    metrics,
    models,
    queue,
    requests,
    workers,
)
from gateway.state import GatewayState


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.start(settings, app.state.metrics)
        app.state.corral = state
        # Exempt what startup built (FastAPI, pydantic's schemas, Celery: hundreds of
        # thousands of objects) from the collector's full passes: each walked them all,
        # stalling every request in flight for 30-80 ms.
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
    routers = (chat, completions, embeddings, management, workers, models, health, requests,
               queue, metrics, files, batches)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    hardening.install(app, settings)  # auth, rate limits, body limits, metrics, CORS
    app.add_middleware(RequestIdMiddleware)
    return app
