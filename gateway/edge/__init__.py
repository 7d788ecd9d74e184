"""The gateway's edge: the HTTP middleware every request passes before a route sees it.

From the outside in: request id (`request_id`) → CORS (only if `cors_origins` is set) →
metrics (`metrics`) → authentication and rate limits (`auth`) → body limits
(`body_limit`) → the app. Authentication comes before the body is read, so a caller
without a key costs a header lookup, never a body. The request head's deadline is not a
middleware but uvicorn's protocol (`head_timeout`).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from common.settings import Settings
from gateway.edge.auth import AuthMiddleware
from gateway.edge.body_limit import BodyLimitMiddleware
from gateway.edge.request_id import RequestIdMiddleware
from gateway.edge.request_metrics import MetricsMiddleware
from gateway.monitoring.metrics import GatewayMetrics
from gateway.tenancy.principals import KeysEpoch

__all__ = ["install"]

# Reply headers a browser client may read (CORS hides all but a few by default).
EXPOSED = [
    "X-Request-ID",
    "X-Request-Priority",
    "x-corral-cache",  # hit | miss, on a model whose response cache is on
    "Retry-After",
    *(
        f"x-ratelimit-{what}-{dim}"
        for what in ("limit", "remaining", "reset")
        for dim in ("requests", "tokens")
    ),
]


def install(
    app: FastAPI,
    settings: Settings,
    redis: aioredis.Redis,
    epoch: KeysEpoch,
    metrics: GatewayMetrics,
) -> None:
    """Add the edge middlewares (Starlette runs the last added first)."""
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(AuthMiddleware, settings=settings, redis=redis, epoch=epoch, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],  # DELETE: /v1/files/{id}
            allow_headers=["*"],
            expose_headers=EXPOSED,
            allow_credentials=False,  # bearer keys, never cookies
        )
    app.add_middleware(RequestIdMiddleware)
