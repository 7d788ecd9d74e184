"""The gateway's Prometheus metrics (`GET /metrics`): what clients asked for and got, as the
edge saw it (`gateway.edge.request_metrics` observes each request), and the queues and workers as
they are when Prometheus scrapes (`refresh`).

Each app has its own registry (no process-wide default), so several apps in one process —
tests — never clash. Labels stay bounded: a key's `name` is chosen by the admin.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.priority import Priority
from common.registry import WorkerInfo

# Seconds, for waits and latencies: coarse below one second (the gateway's own hops), then
# thirteen bounds to a decade from 1 s, each at most 1.25 x the one before, up to an hour
# (`max_request_timeout`), so p50/p95 read with `histogram_quantile` (which interpolates
# inside a bucket) stay within a few percent from seconds to minutes.
_STEPS = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8)
SECONDS_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75),
    *(step * decade for decade in (1, 10, 100) for step in _STEPS),
    *(1000, 1250, 1500, 1800, 2400, 3000, 3600),
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["endpoint", "model", "priority"]
        self.requests = Counter(
            "corral_requests",
            "Generation requests answered, by status.",
            [*labels, "status"],
            registry=r,
        )
        self.duration = Histogram(
            "corral_request_duration_seconds",
            "End-to-end time of a generation request.",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds",
            "Time from a request's arrival to a worker starting it (a model load included).",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self.completion_tokens = Counter(
            "corral_completion_tokens",
            "Completion tokens of finished requests.",
            labels,
            registry=r,
        )
        self.ratelimited = Counter(
            "corral_ratelimit_rejections",
            "Requests refused by a key's rate limit.",
            ["key", "limit"],
            registry=r,
        )
        self.active_streams = Gauge(
            "corral_active_streams", "Requests this gateway is relaying now.", registry=r
        )
        self.queue_depth = Gauge(
            "corral_queue_depth_requests",
            "Requests waiting in a model's queue: each priority's, and batch items'.",
            ["model", "priority"],
            registry=r,
        )
        self.workers = Gauge(
            "corral_workers", "Live workers, by model and state.", ["model", "state"], registry=r
        )
        self.cache_hits = Counter(
            "corral_cache_hits",
            "Requests answered from the response cache (no worker, no queue).",
            ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "corral_cache_misses",
            "Requests to a model whose response cache is on that it could not answer.",
            ["model"],
            registry=r,
        )
        self.cache_stores = Counter(
            "corral_cache_stores",
            "Replies kept in the response cache.",
            ["model"],
            registry=r,
        )
        self.affinity = Counter(
            "corral_affinity",
            "Requests routed by prefix affinity: hit (to the replica that ran their key "
            "last), new (no ready replica ran the key: the shared queue), spill (a hit moved "
            "to the shared queue: its replica did not take it within affinity_wait).",
            ["model", "result"],
            registry=r,
        )
        self.promotions = Counter(
            "corral_promotions",
            "Low requests promoted to normal after `low_max_wait`.",
            ["model"],
            registry=r,
        )

    def refresh(
        self, workers: list[WorkerInfo], depths: dict[str, dict[str, int]], active: int
    ) -> None:
        """Set what lives in Redis (queues, the worker registry), read just before a scrape."""
        self.active_streams.set(active)
        self.queue_depth.clear()  # a model gone from the catalog loses its series
        for model, per_queue in depths.items():
            # every priority (0 when empty), and the batch queue (`priority="batch"`)
            for label, depth in ({p.value: 0 for p in Priority} | per_queue).items():
                self.queue_depth.labels(model=model, priority=label).set(depth)
        self.workers.clear()
        for info in workers:
            self.workers.labels(model=info.model or "", state=info.state.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
