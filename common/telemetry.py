"""Per-model request telemetry in Redis, shared by every gateway: what workers measured about
the requests they ended, summed into time buckets.

A worker adds each request it ends to two buckets of its model (a 10-second one kept two
minutes, a one-minute one kept an hour) with one `EVAL` of `RECORD_LUA`, sent in the
pipeline that already carries the request's final frame: no extra round trip. Readers sum
the buckets of a window: the last minute is the last six 10-second buckets, the last hour
the last sixty one-minute ones (so a window covers its length less up to one bucket).

A bucket is a hash of counters (`FIELDS`) and two histograms, time to first token (`t<b>`)
and queue wait (`w<b>`), in log-spaced bins eight to a doubling: percentiles read from them
are within 9%. Speeds are llama-server's own `timings` summed over the window (tokens ÷
time spent on them): the speed of one request in its slot, not the model's throughput.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common import redis_keys
from common.tracking import RequestState

SPANS = {10: 120, 60: 3720}  # bucket length (s) -> how long a bucket is kept (s)
BINS_PER_DOUBLING = 8

# KEYS: the buckets. ARGV: their TTLs (one per key), then field/increment pairs.
RECORD_LUA = """
local pairs_from = #KEYS + 1
for k = 1, #KEYS do
  for i = pairs_from, #ARGV, 2 do redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[k], ARGV[k])
end
return 1
"""


@dataclass(frozen=True)
class Outcome:
    """What a worker measured about one request it ended (times in ms)."""

    state: RequestState
    interactive: bool = True  # False: a batch item (no wait or TTFT histogram)
    wait_ms: float | None = None  # enqueued -> started (or -> dropped)
    service_ms: float | None = None  # started -> ended, for a request that ran
    ttft_ms: float | None = None  # enqueued -> first token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # of the prompt, taken from the engine's prompt cache
    timings: Mapping[str, Any] | None = None  # llama-server's `timings` of the request

    def record_fields(self) -> dict[str, str]:
        """What the request's record shows of it (`common.tracking.RequestRecord`)."""
        out: dict[str, str] = {}
        if self.ttft_ms is not None:
            out["ttft_ms"] = f"{self.ttft_ms:.1f}"
        if self.prompt_tokens or self.completion_tokens:
            out["prompt_tokens"] = str(self.prompt_tokens)
            out["completion_tokens"] = str(self.completion_tokens)
        if self.cached_tokens is not None:
            out["cached_tokens"] = str(self.cached_tokens)
        return out

    def increments(self) -> dict[str, int]:
        out = {"n": 1, self.state.value: 1}
        if self.prompt_tokens:
            out["ptok"] = self.prompt_tokens
        if self.completion_tokens:
            out["ctok"] = self.completion_tokens
        t = self.timings or {}
        if _num(t.get("prompt_n")) and _num(t.get("prompt_ms")):
            out["pn"], out["pus"] = int(t["prompt_n"]), _us(t["prompt_ms"])
        if _num(t.get("predicted_n")) and _num(t.get("predicted_ms")):
            out["gn"], out["gus"] = int(t["predicted_n"]), _us(t["predicted_ms"])
        if self.service_ms is not None:
            out["svc_n"], out["svc_us"] = 1, _us(self.service_ms)
        if self.interactive and self.wait_ms is not None:
            out[f"w{bin_of(self.wait_ms)}"] = 1
        if self.interactive and self.ttft_ms is not None:
            out[f"t{bin_of(self.ttft_ms)}"] = 1
        return out


def record_args(model: str, outcome: Outcome, now: float) -> tuple[list[str], list[Any]]:
    """`RECORD_LUA`'s keys and arguments for one request ended at `now` (epoch s)."""
    keys = [redis_keys.telemetry_key(model, span, int(now // span)) for span in SPANS]
    args: list[Any] = list(SPANS.values())
    for field, by in outcome.increments().items():
        args += (field, by)
    return keys, args


def window_keys(model: str, span: int, count: int, now: float) -> list[str]:
    """The `count` latest buckets of `span` seconds, the current one first."""
    last = int(now // span)
    return [redis_keys.telemetry_key(model, span, last - i) for i in range(count)]


def bin_of(ms: float) -> int:
    """The histogram bin of `ms`: 0 below 1 ms, else 1 + floor(8 · log2(ms))."""
    return 0 if ms < 1 else 1 + math.floor(BINS_PER_DOUBLING * math.log2(ms))


def bin_top(b: int) -> float:
    """The upper bound (ms) of bin `b`."""
    return 1.0 if b <= 0 else 2 ** (b / BINS_PER_DOUBLING)


@dataclass
class Summary:
    """A window's buckets summed."""

    counts: dict[str, int]
    ttft: dict[int, int]
    wait: dict[int, int]

    @classmethod
    def of(cls, buckets: Iterable[Mapping[Any, Any]]) -> Summary:
        counts: dict[str, int] = {}
        ttft: dict[int, int] = {}
        wait: dict[int, int] = {}
        for raw in buckets:
            for k, v in raw.items():
                field, n = redis_keys.text(k), int(v)
                if field[0] in "tw" and field[1:].lstrip("-").isdigit():
                    hist = ttft if field[0] == "t" else wait
                    hist[int(field[1:])] = hist.get(int(field[1:]), 0) + n
                else:
                    counts[field] = counts.get(field, 0) + n
        return cls(counts, ttft, wait)

    def rate(self, n: str, us: str) -> float | None:
        """Tokens per second: `n` tokens over `us` microseconds spent on them."""
        spent = self.counts.get(us, 0)
        return round(self.counts.get(n, 0) * 1e6 / spent, 1) if spent > 0 else None

    def mean_service_s(self) -> float | None:
        n = self.counts.get("svc_n", 0)
        return self.counts.get("svc_us", 0) / n / 1e6 if n else None

    def speed(self) -> dict[str, Any]:
        return {
            "requests": self.counts.get("n", 0),
            "prompt_tokens_per_s": self.rate("pn", "pus"),
            "gen_tokens_per_s": self.rate("gn", "gus"),
        }

    def report(self) -> dict[str, Any]:
        """The `/v1/telemetry` view of the window."""
        c = self.counts
        mean = self.mean_service_s()
        return {
            **self.speed(),
            "done": c.get(RequestState.DONE.value, 0),
            "errors": c.get(RequestState.FAILED.value, 0) + c.get(RequestState.EXPIRED.value, 0),
            "cancelled": c.get(RequestState.CANCELLED.value, 0),
            "prompt_tokens": c.get("ptok", 0),
            "completion_tokens": c.get("ctok", 0),
            "service_ms_mean": round(mean * 1000, 1) if mean is not None else None,
            "ttft_ms": percentiles(self.ttft),
            "queue_wait_ms": percentiles(self.wait),
        }


def percentiles(hist: Mapping[int, int], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> Any:
    """p50/p90/p99 (ms, each its bin's upper bound) of a histogram; None if it is empty."""
    total = sum(hist.values())
    if not total:
        return None
    out: dict[str, float] = {}
    for q in qs:
        need, seen = q * total, 0
        for b in sorted(hist):
            seen += hist[b]
            if seen >= need:
                out[f"p{round(q * 100)}"] = round(bin_top(b), 1)
                break
    return out


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def _us(ms: Any) -> int:
    return max(0, round(float(ms) * 1000))
