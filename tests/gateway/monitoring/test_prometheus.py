"""A real Prometheus (Debian's `prometheus` package; `.ci/run` installs it) on a loopback
port, configured from `deploy/prometheus/prometheus.yml` with its addresses pointed at a
keyed gateway of the shared cluster: it scrapes the gateway with the admin key, and every
worker `/metrics/targets` lists, and finds all of them up (issue 24: the targets named the
workers' host, where a worker listening on 127.0.0.1 was not)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from common.net import free_port
from tests.conftest import Cluster
from tests.gateway.helpers import ADMIN_KEY, bearer
from tests.support import wait_for

PROMETHEUS = shutil.which("prometheus")
DEPLOYED = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "prometheus.yml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="no Prometheus here: apt-get install prometheus"),
]


def config_for(gateway: str, key_file: Path) -> dict[str, Any]:
    """The deployed config, its gateway address and secret file replaced, scraping fast."""
    config: dict[str, Any] = yaml.safe_load(DEPLOYED.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["corral-gateway"]["static_configs"] = [{"targets": [gateway]}]
    jobs["corral-gateway"]["authorization"]["credentials_file"] = str(key_file)
    (sd,) = jobs["corral-workers"]["http_sd_configs"]
    sd["url"] = f"http://{gateway}/metrics/targets"
    sd["refresh_interval"] = "1s"
    sd["authorization"]["credentials_file"] = str(key_file)
    return config


@pytest.fixture
def prometheus(gw: Cluster, tmp_path: Path) -> Iterator[str]:
    key_file = tmp_path / "admin_key"
    key_file.write_text(ADMIN_KEY)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(config_for(gw.base_url.removeprefix("http://"), key_file)))
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    assert PROMETHEUS is not None
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://{address}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -15):
            print(log.read_text()[-3000:])


def active_targets(prometheus: str) -> list[dict[str, Any]]:
    try:
        reply = httpx.get(f"{prometheus}/api/v1/targets", params={"state": "active"}, timeout=2)
        found: list[dict[str, Any]] = reply.json()["data"]["activeTargets"]
        return found
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def test_prometheus_scrapes_the_gateway_and_every_listed_worker(
    gw: Cluster, prometheus: str
) -> None:
    listed = httpx.get(f"{gw.base_url}/metrics/targets", headers=bearer(ADMIN_KEY), timeout=10)
    workers = {t for group in listed.json() for t in group["targets"]}
    assert len(workers) >= 2, listed.text  # the shared cluster's chat and embedding workers
    wanted = {*workers, gw.base_url.removeprefix("http://")}

    def all_up() -> bool:
        seen = {t["labels"]["instance"]: t["health"] for t in active_targets(prometheus)}
        return wanted <= set(seen) and all(seen[t] == "up" for t in wanted)

    if not wait_for(all_up, 30, 0.5):
        states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in active_targets(prometheus)]
        pytest.fail(f"not all up: {states}")
    query = httpx.get(f"{prometheus}/api/v1/query", params={"query": "corral_worker_slots"})
    series = query.json()["data"]["result"]
    assert {s["metric"]["instance"] for s in series} >= workers  # their own series, scraped
