"""The gateway's edge, in order from the outside in (the request id stays outermost, added
by `create_app`): CORS (only if `cors_origins` is set) → metrics → authentication and rate
limits → body limits → the app. Authentication comes before the body is read, so a
caller without a key costs a header lookup, never a body."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from common.settings import Settings
from gateway.auth import AuthMiddleware
from gateway.limits import BodyLimitMiddleware
from gateway.metrics import GatewayMetrics, MetricsMiddleware

# Reply headers a browser client may read (CORS hides all but a few by default).
EXPOSED = [
    "X-Request-ID", "X-Request-Priority", "Retry-After",
    *(f"x-ratelimit-{what}-{dim}" for what in ("limit", "remaining", "reset")
      for dim in ("requests", "tokens")),
]  # fmt: skip


def install(app: FastAPI, settings: Settings) -> None:
    """Add the edge middlewares (Starlette runs the last added first)."""
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(AuthMiddleware, settings=settings, metrics=metrics)
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
