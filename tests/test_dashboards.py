"""The Grafana dashboard and the Prometheus config match what the code exports:
every panel's query names only metrics that the gateway or a worker really serves."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.registry import WorkerInfo, WorkerState
from gateway.monitoring.metrics import GatewayMetrics
from workers import metrics_server as worker_metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
_METRIC = re.compile(r"\bcorral_[a-z0-9_]+\b")


def exported(registry: Any) -> set[str]:
    """The series names a scrape shows (a counter only as `_total`, a histogram only as
    its `_bucket`, `_count` and `_sum`)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES.get(family.type, [""]))
    return names


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    # A ready worker with everything known, so its live collector yields every family.
    info = WorkerInfo(
        id="w",
        host="h",
        pid=1,
        model="m",
        slots=2,
        state=WorkerState.READY,
        upstream="http://127.0.0.1:1",
        budget_mb=100,
        used_mb=50,
    )
    llama = {
        "llamacpp:requests_processing": 1.0,
        "llamacpp:prompt_tokens_total": 3.0,
        "llamacpp:tokens_predicted_total": 5.0,
        "llamacpp:tokens_predicted_seconds_total": 0.5,
    }
    monkeypatch.setattr(worker_metrics._Live, "_upstream", lambda self, info: llama)
    worker = worker_metrics.WorkerMetrics(lambda: info, lambda: None)
    return exported(GatewayMetrics().registry) | exported(worker.registry)


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)  # rows may hold their panels


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_queries_exported_metrics(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = exported_names(monkeypatch)
    dashboard = json.loads(path.read_text())
    checked = 0
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel.get('title')!r} has no query"
        for expr in exprs:
            names = _METRIC.findall(expr)
            assert names, f"panel {panel['title']!r}: {expr!r} names no corral metric"
            unknown = set(names) - known
            assert not unknown, f"panel {panel['title']!r} queries {unknown}, not exported"
            checked += 1
    assert checked >= 10


def test_dashboard_and_datasource_are_provisioned() -> None:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    grafana = ROOT / "deploy" / "grafana" / "provisioning"
    sources = yaml.safe_load((grafana / "datasources" / "prometheus.yml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            if panel.get("type") != "row":
                assert panel["datasource"]["uid"] in uids, panel["title"]
    provider = yaml.safe_load((grafana / "dashboards" / "corral.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_gateway_and_discovers_workers() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway, workers = jobs["corral-gateway"], jobs["corral-workers"]
    assert gateway["authorization"]["credentials_file"]  # /metrics needs the admin key
    (sd,) = workers["http_sd_configs"]
    assert sd["url"].endswith("/metrics/targets") and workers["honor_labels"] is True
