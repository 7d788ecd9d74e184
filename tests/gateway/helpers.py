"""Helpers for the tests of the gateway's edge (keys, limits, bad input, metrics): extra
gateway processes on the session's Valkey (they share its workers), the `corral keys` CLI,
keys made directly in Redis, and Prometheus text parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import redis
from prometheus_client.parser import text_string_to_metric_families

from common import redis_keys
from common.apikeys import issue
from tests.conftest import Cluster, start_cluster
from tests.support import env_without_corral, openai_client

ADMIN_KEY = "sk-admin-" + "t3st" * 8


def start_gateway(redis_url: str, log_dir: Path, **env: str) -> Cluster:
    """One more gateway (no workers of its own) on `redis_url`."""
    # worker_states given by position: no key of `env` can then be taken for it
    return start_cluster(redis_url, log_dir, [], ("ready",), **env)


def corral(redis_url: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {**env_without_corral(), "CORRAL_REDIS_URL": redis_url, **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_key(redis_url: str, name: str, **limits: object) -> tuple[str, str]:
    """A user key straight into Redis (the CLI is tested on its own): (id, secret)."""
    key, secret = issue(name, **limits)
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(redis_keys.API_KEYS, key.digest, key.model_dump_json())
        client.publish(redis_keys.KEYS_CHANGED, key.id)  # as the CLI does: gateways re-read keys
    finally:
        client.close()
    return key.id, secret


def drop_keys(redis_url: str) -> None:
    """No key left behind: the session's shared gateway runs open only while none exist."""
    client = redis.Redis.from_url(redis_url)
    try:
        buckets = list(client.scan_iter(redis_keys.ratelimit_key("*", "*")))
        client.delete(redis_keys.API_KEYS, *buckets)
        client.publish(redis_keys.KEYS_CHANGED, "all")
    finally:
        client.close()


def full_logs(cluster: Cluster) -> str:
    """Every line every process of `cluster` logged (`Cluster.logs()` keeps only tails)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(cluster.log_dir.glob("*.log")))


def client(base_url: str, secret: str) -> openai.OpenAI:
    return openai_client(f"{base_url}/v1", secret)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_envelope(r: httpx.Response, status: int, type_: str, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == type_ and err["message"], err
    if code is not None:
        assert err["code"] == code, err


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text as {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)
