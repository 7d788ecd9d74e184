"""Where a server is reached: its own address, or for an any-address listener this host's
address towards the cluster (issue 24: worker metrics targets named the host, which a stock
Debian maps to 127.0.1.1, where a worker listening on 127.0.0.1 is not)."""

from __future__ import annotations

import socket

import pytest

from common.net import announced_host
from common.registry import WorkerInfo, WorkerState


@pytest.mark.parametrize("bind", ["127.0.0.1", "10.1.2.3", "::1", "worker-7.example"])
def test_a_specific_address_is_announced_as_it_is(bind: str) -> None:
    assert announced_host(bind, "127.0.0.1") == bind


@pytest.mark.parametrize("bind", ["0.0.0.0", "", "::"])
def test_any_address_is_announced_as_the_way_to_redis(bind: str) -> None:
    assert announced_host(bind, "127.0.0.1") == "127.0.0.1"  # Redis on this host: loopback
    assert announced_host(bind, None) == socket.gethostname()  # nothing to route towards


def test_metrics_targets_put_ipv6_in_brackets() -> None:
    info = WorkerInfo(id="w", host="vm", pid=1, slots=1, state=WorkerState.READY)
    assert info.metrics_target() is None  # it serves no /metrics
    assert info.model_copy(update={"metrics_port": 9400}).metrics_target() == "vm:9400"
    on = info.model_copy(update={"metrics_port": 9400, "metrics_host": "127.0.0.1"})
    assert on.metrics_target() == "127.0.0.1:9400"
    assert on.model_copy(update={"metrics_host": "::1"}).metrics_target() == "[::1]:9400"
