"""The gateway's histograms are fine enough to read p50/p95 of queue waits and time to first
token from seconds to minutes (issue 24: with a 30 s to 60 s bucket, waits all under 43 s
read as a p95 of 54 s). Percentiles are read the way Prometheus's `histogram_quantile` reads
them: linearly inside the bucket the rank falls in."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.monitoring.metrics import SECONDS_BUCKETS, GatewayMetrics
from tests.gateway.helpers import samples


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus's estimate from (upper bound, cumulative count) pairs, +Inf last."""
    total = cumulative[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def estimate(values: list[float], q: float) -> float:
    registry = CollectorRegistry()
    hist = Histogram("wait_seconds", "", buckets=SECONDS_BUCKETS, registry=registry)
    for v in values:
        hist.observe(v)
    found = samples(generate_latest(registry).decode())
    cumulative = sorted(
        (float(dict(labels)["le"]), count)
        for (name, labels), count in found.items()
        if name == "wait_seconds_bucket"
    )
    return histogram_quantile(q, cumulative)


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.parametrize("typical", [1.5, 4, 12, 35, 90, 240, 500, 900])
@pytest.mark.parametrize("spread", [0.2, 0.5])
def test_p50_and_p95_within_a_tenth_from_seconds_to_minutes(typical: float, spread: float) -> None:
    rng = random.Random(int(typical * 100))
    waits = [typical * rng.lognormvariate(0, spread) for _ in range(2000)]
    for q in (0.5, 0.95):
        assert estimate(waits, q) == pytest.approx(exact(waits, q), rel=0.1), q


def test_waits_under_43_s_no_longer_read_as_54() -> None:
    rng = random.Random(24)
    waits = [rng.uniform(20, 43) for _ in range(500)]
    assert exact(waits, 0.95) < estimate(waits, 0.95) < 47  # the bucket from 40 s to 50 s


def test_every_duration_histogram_uses_them() -> None:
    metrics = GatewayMetrics()
    for hist in (metrics.ttft, metrics.queue_wait, metrics.duration):
        assert tuple(hist._upper_bounds[:-1]) == SECONDS_BUCKETS  # +Inf added by the client
    assert list(SECONDS_BUCKETS) == sorted(set(SECONDS_BUCKETS))
