"""`common.telemetry`: the bucket layout workers write and gateways read, the histogram's
bins and percentiles, and the write script on a real Valkey."""

from __future__ import annotations

import time

import pytest
import redis

from common import telemetry
from common.telemetry import Outcome, Summary, bin_of, bin_top, percentiles
from common.tracking import RequestState
from corral.redis_server import EmbeddedRedis


@pytest.mark.parametrize("ms", [0.2, 1.0, 7.3, 99.0, 1234.5, 600_000.0])
def test_a_bin_holds_its_value_within_nine_percent(ms: float) -> None:
    b = bin_of(ms)
    assert bin_top(b - 1) <= ms < bin_top(b) or (b == 0 and ms < 1)
    assert bin_top(b) <= max(ms, 1.0) * 2 ** (1 / 8) + 1e-9


def test_percentiles_read_from_the_bins() -> None:
    hist: dict[int, int] = {}
    for ms in [10.0] * 50 + [100.0] * 40 + [1000.0] * 10:
        hist[bin_of(ms)] = hist.get(bin_of(ms), 0) + 1
    p = percentiles(hist)
    assert 10 <= p["p50"] < 11 and 100 <= p["p90"] < 110 and 1000 <= p["p99"] < 1100
    assert percentiles({}) is None


def test_outcomes_sum_into_a_report(redis_server: EmbeddedRedis) -> None:
    """Two requests written with the script into both buckets read back as one window."""
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    model, now = f"tel-{time.time_ns()}", time.time()
    timings = {"prompt_n": 50, "prompt_ms": 10.0, "predicted_n": 20, "predicted_ms": 40.0}
    done = Outcome(
        RequestState.DONE,
        wait_ms=5,
        service_ms=50,
        ttft_ms=16,
        prompt_tokens=50,
        completion_tokens=20,
        timings=timings,
    )
    for outcome in (done, Outcome(RequestState.EXPIRED, wait_ms=9000)):
        keys, args = telemetry.record_args(model, outcome, now)
        r.eval(telemetry.RECORD_LUA, len(keys), *keys, *args)
    for span, ttl in telemetry.SPANS.items():
        (key,) = telemetry.window_keys(model, span, 1, now)
        assert 0 < r.ttl(key) <= ttl
        report = Summary.of([r.hgetall(key)]).report()
        assert (report["requests"], report["done"], report["errors"]) == (2, 1, 1)
        assert (report["prompt_tokens"], report["completion_tokens"]) == (50, 20)
        assert report["prompt_tokens_per_s"] == 5000.0 and report["gen_tokens_per_s"] == 500.0
        assert report["service_ms_mean"] == 50.0
        assert 16 <= report["ttft_ms"]["p50"] < 17.5
        assert 9000 <= report["queue_wait_ms"]["p99"] < 9800
    r.close()


def test_a_batch_item_counts_without_waits_or_ttft() -> None:
    item = Outcome(RequestState.DONE, interactive=False, wait_ms=3_600_000, ttft_ms=5)
    fields = item.increments()
    assert fields["n"] == 1 and not any(f[0] in "tw" and f[1:].isdigit() for f in fields)
