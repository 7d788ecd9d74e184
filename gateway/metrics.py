"""The gateway's Prometheus metrics: what clients asked for and got, seen at the HTTP edge.

`MetricsMiddleware` times every generation request (end to end, and to the first streamed
byte: the gateway sends a stream's headers with its first chunk, so that is the time to
first token as the client sees it) and counts it by endpoint, model, priority and status.
Token counts come from the `usage` of the request's final frame. Queue depths, workers
and open streams are read when Prometheus scrapes (`refresh`), so they are never stale.

Each app has its own registry (no process-wide default), so several apps in one process —
tests — never clash. Labels stay bounded: `model` is set only once the catalog knew the
model (before that it is `unknown`), and a key's `name` is chosen by the admin.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import keys
from common.priority import Priority
from common.registry import WorkerInfo

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
UNKNOWN = "unknown"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["endpoint", "model", "priority"]
        self.requests = Counter(
            "corral_requests", "Generation requests answered, by status.",
            [*labels, "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "corral_request_duration_seconds", "End-to-end time of a generation request.",
            labels, buckets=_E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds", "Time to the first streamed chunk.",
            labels, buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "corral_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self.completion_tokens = Counter(
            "corral_completion_tokens", "Completion tokens of finished requests.", labels,
            registry=r,
        )  # fmt: skip
        self.ratelimited = Counter(
            "corral_ratelimit_rejections", "Requests refused by a key's rate limit.",
            ["key", "limit"], registry=r,
        )  # fmt: skip
        self.active_streams = Gauge(
            "corral_active_streams", "Requests this gateway is relaying now.", registry=r
        )
        self.queue_depth = Gauge(
            "corral_queue_depth_requests", "Requests waiting in a model's priority queue.",
            ["model", "priority"], registry=r,
        )  # fmt: skip
        self.workers = Gauge(
            "corral_workers", "Live workers, by model and state.", ["model", "state"], registry=r
        )
        self.promotions = Counter(
            "corral_promotions", "Low requests promoted to normal after `low_max_wait`.",
            ["model"], registry=r,
        )  # fmt: skip

    async def refresh(self, client: aioredis.Redis, models: list[str], active: int) -> None:
        """Read what lives in Redis (queues, the worker registry) just before a scrape."""
        self.active_streams.set(active)
        pipe = client.pipeline(transaction=False)
        pairs = [(m, p) for m in models for p in Priority]
        for model, priority in pairs:
            pipe.llen(keys.queue_name(model, priority))
        pipe.smembers(keys.WORKERS)
        *depths, members = await pipe.execute()
        self.queue_depth.clear()  # a model gone from the catalog loses its series
        for (model, priority), depth in zip(pairs, depths, strict=True):
            self.queue_depth.labels(model=model, priority=priority.value).set(depth)
        entries = await client.mget([keys.worker_key(str(m)) for m in members]) if members else []
        self.workers.clear()
        for raw in entries:
            if raw is not None:
                info = WorkerInfo.model_validate_json(raw)
                self.workers.labels(model=info.model or "", state=info.state.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
            self._observe(scope, endpoint, status, time.perf_counter() - start,
                          first - start if stream and first is not None else None)  # fmt: skip

    def _observe(
        self, scope: Scope, endpoint: str, status: int, total: float, ttft: float | None
    ) -> None:
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
        usage = usage_of(scope) or {}
        if usage.get("prompt_tokens"):
            self._m.prompt_tokens.labels(**labels).inc(int(usage["prompt_tokens"]))
        if usage.get("completion_tokens"):
            self._m.completion_tokens.labels(**labels).inc(int(usage["completion_tokens"]))
