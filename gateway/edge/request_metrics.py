"""The edge's clock: `MetricsMiddleware` times every generation request (end to end; to
the first streamed byte: the gateway sends a stream's headers with its first chunk, so that
is the time to first token as the client sees it; and to the worker's start, its queue
wait) and counts it by endpoint, model, priority and status into the gateway's metrics
(`gateway.monitoring.metrics`). Token counts come from the `usage` of the request's final
frame.

Labels stay bounded: `model` is set only once the catalog knew the model (before that it
is `unknown`).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.monitoring.metrics import GatewayMetrics

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
UNKNOWN = "unknown"


def usage_of(scope: Scope) -> dict[str, Any] | None:
    """The `usage` of the request's final frame, once the relay has seen it. A stream that
    ended without one (its client left, its deadline passed) used the tokens it was sent:
    llama-server streams one a chunk. Without this, a key's token limit never counted a
    stream its client dropped before the end."""
    sub = scope.get("state", {}).get("subscription")
    usage = getattr(sub, "usage", None)
    if isinstance(usage, dict):
        return usage
    relayed = getattr(sub, "relayed", 0)
    if isinstance(relayed, int) and relayed > 0:
        return {"completion_tokens": relayed, "total_tokens": relayed}
    return None


CLIENT_LEFT = 499  # nginx's "client closed request", as the non-streaming path replies


class MetricsMiddleware:
    """Times and counts the generation endpoints (pure ASGI: nothing added per chunk but
    a clock read on the first one)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self._m = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0  # no reply started yet
        stream = False
        first: float | None = None

        async def watch(message: Message) -> None:
            nonlocal status, stream, first
            if message["type"] == "http.response.start":
                status = message["status"]
                stream = (
                    Headers(raw=message.get("headers", []))
                    .get("content-type", "")
                    .startswith("text/event-stream")
                )
            elif first is None and message.get("body"):
                first = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not status:  # a stream whose client left before its headers, or a crash
                status = CLIENT_LEFT if scope.get("state", {}).get("client_left") else 500
            self._observe(
                scope,
                endpoint,
                status,
                start,
                first - start if stream and first is not None else None,
            )

    def _observe(
        self, scope: Scope, endpoint: str, status: int, begun: float, ttft: float | None
    ) -> None:
        total = time.perf_counter() - begun
        state = scope.get("state", {})
        labels = {
            "endpoint": endpoint,
            "model": state.get("model", UNKNOWN),
            "priority": state.get("priority", UNKNOWN),
        }
        self._m.requests.labels(**labels, status=str(status)).inc()
        self._m.duration.labels(**labels).observe(total)
        if ttft is not None and status == 200:
            self._m.ttft.labels(**labels).observe(ttft)
        started = getattr(state.get("subscription"), "started_at", None)
        if isinstance(started, float):
            self._m.queue_wait.labels(**labels).observe(max(0.0, started - begun))
        usage = usage_of(scope) or {}
        if usage.get("prompt_tokens"):
            self._m.prompt_tokens.labels(**labels).inc(int(usage["prompt_tokens"]))
        if usage.get("completion_tokens"):
            self._m.completion_tokens.labels(**labels).inc(int(usage["completion_tokens"]))
