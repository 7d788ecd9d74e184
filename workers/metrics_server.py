"""A worker's own Prometheus `/metrics`: slots busy, model state, load time, restarts,
tokens and tokens/s, memory used against the budget. Its port is in the registry entry
(`WorkerInfo.metrics_port`), which is how Prometheus finds it (`GET /metrics/targets` on
the gateway); when the worker leaves, the entry expires, the target goes, and its series
go stale and disappear.

Why nothing is counted in the Celery pool children that run the tasks: the engine child
already counts every prompt and generated token and knows which slots are busy, and this
(main) process owns that child. So the values are read from the engine's own metrics page
when Prometheus scrapes, and re-exported under `corral_*` names (`ENGINE_NAMES`: llama-server's,
vLLM's and SGLang's; an engine with none of them, or no page, reports the rest). The other ways
are worse: prometheus_client's multiprocess mode needs a shared directory of mmap files
that must be wiped at every start, leaves the series of dead children behind and cannot
do live gauges well; children reporting over Redis add writes to the token path and lose
counts when a child is killed mid-task. Reading at scrape time also means a model swapped
out takes its series along, with no cleanup code.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.registry import WorkerInfo, WorkerState

log = logging.getLogger(__name__)

_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([-+0-9.eEnaNinf]+)(?: -?\d+)?$")

# What each engine calls the figures Corral re-exports, llama-server's first.
ENGINE_NAMES = {
    "busy": (
        "llamacpp:requests_processing",
        "vllm:num_requests_running",
        "sglang:num_running_reqs",
    ),
    "prompt": (
        "llamacpp:prompt_tokens_total",
        "vllm:prompt_tokens_total",
        "sglang:prompt_tokens_total",
    ),
    "generated": (
        "llamacpp:tokens_predicted_total",
        "vllm:generation_tokens_total",
        "sglang:generation_tokens_total",
    ),
}


def parse_samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page by name, summed over their labels (vLLM's and
    SGLang's carry `model_name` and the like; llama-server's none)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(3))
    return out


def engine_figures(samples: dict[str, float]) -> dict[str, float]:
    """`busy`, `prompt` and `generated` from whichever engine's names `samples` holds."""
    out = {}
    for figure, names in ENGINE_NAMES.items():
        found = next((samples[n] for n in names if n in samples), None)
        if found is not None:
            out[figure] = found
    return out


# The held model's engine metrics page, if it has one and is ready.
EnginePage = Callable[[], str | None]


class WorkerMetrics:
    def __init__(
        self,
        info: Callable[[], WorkerInfo],
        server_pid: Callable[[], int | None],
        engine_page: EnginePage = lambda: None,
    ):
        self.registry = CollectorRegistry()
        self.load_seconds = Histogram(
            "corral_worker_model_load_seconds",
            "Time from spawning the engine to ready.",
            ["worker", "model"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self._loads = Counter(
            "corral_worker_model_loads",
            "Models loaded.",
            ["worker", "model"],
            registry=self.registry,
        )
        self.registry.register(_Live(info, server_pid, engine_page))
        self._info = info
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a thread (`port` 0: a free one); returns the port."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("worker metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def model_loaded(self, model: str, seconds: float) -> None:
        worker = self._info().id
        self.load_seconds.labels(worker=worker, model=model).observe(seconds)
        self._loads.labels(worker=worker, model=model).inc()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Live(Collector):
    """Everything read at scrape time: the registry entry and the engine's metrics page."""

    def __init__(
        self,
        info: Callable[[], WorkerInfo],
        server_pid: Callable[[], int | None],
        engine_page: EnginePage,
    ):
        self._info = info
        self._pid = server_pid
        self._page = engine_page

    def collect(self) -> Iterator[Metric]:
        info = self._info()
        labels = ["worker", "model"]
        values = [info.id, info.model or ""]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=labels)
                g.add_metric(values, value)
                yield g

        def counter(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                c = CounterMetricFamily(name, doc, labels=labels)
                c.add_metric(values, value)
                yield c

        raw = self._upstream(info)
        up = engine_figures(raw)
        busy = up.get("busy", float(info.slots_busy))
        yield from gauge(
            "corral_worker_slots", "Slots (parallel requests) of the worker.", info.slots
        )
        yield from gauge("corral_worker_busy_slots", "Slots generating now.", busy)
        state = GaugeMetricFamily(
            "corral_worker_model_state",
            "1 for the worker's current state.",
            labels=[*labels, "state"],
        )
        for s in WorkerState:
            state.add_metric([*values, s.value], 1.0 if info.state is s else 0.0)
        yield state
        yield from counter(
            "corral_worker_restarts", "Engine crashes restarted.", float(info.restarts)
        )
        yield from counter(
            "corral_worker_prompt_tokens",
            "Prompt tokens processed.",
            up.get("prompt"),
        )
        yield from counter(
            "corral_worker_generated_tokens",
            "Tokens generated.",
            up.get("generated"),
        )
        yield from gauge(
            "corral_worker_tokens_per_second",
            "Generation speed while generating (tokens / generation time).",
            _speed(raw),
        )
        used = info.used_mb * 2**20 if info.used_mb else self._rss()
        yield from gauge("corral_worker_memory_used_bytes", "Memory used by the model.", used)
        budget = info.budget_mb * 2**20 if info.budget_mb else None
        yield from gauge("corral_worker_memory_budget_bytes", "The worker's memory budget.", budget)

    def _upstream(self, info: WorkerInfo) -> dict[str, float]:
        page = self._page()
        if page is None or info.state is not WorkerState.READY:
            return {}
        try:
            return parse_samples(httpx.get(page, timeout=1.0).text)
        except httpx.HTTPError as exc:
            log.debug("cannot read the engine's metrics: %r", exc)
            return {}

    def _rss(self) -> float | None:
        pid = self._pid()
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            return float(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        except psutil.Error:
            return None


def _speed(up: dict[str, float]) -> float | None:
    tokens = up.get("llamacpp:tokens_predicted_total")
    seconds = up.get("llamacpp:tokens_predicted_seconds_total")
    if tokens is None or seconds is None:
        return None
    # llama-server sums whole milliseconds: a few fast tokens take "0 s", which says nothing
    return tokens / seconds if seconds > 0 else None
