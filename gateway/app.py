"""`create_app(settings)`: the gateway's FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.settings import Settings
from gateway import errors
from gateway.middleware import RequestIdMiddleware
from gateway.routes import chat, completions, embeddings, health, models, queue, requests
from gateway.state import GatewayState


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.start(settings)
        app.state.corral = state
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="Corral", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (chat, completions, embeddings, models, health, requests, queue):
        app.include_router(module.router)
    app.add_middleware(RequestIdMiddleware)
    return app
