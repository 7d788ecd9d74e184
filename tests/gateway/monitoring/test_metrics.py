"""Metrics and request ids after real traffic: the gateway's /metrics, each
worker's own /metrics (found through the registry and /metrics/targets), a worker's
series gone when it leaves, and the request id on every log line of a request."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import CHAT, EMBED, Cluster
from tests.gateway.helpers import samples, value
from tests.support import corral_child, wait_for, workers

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def test_gateway_metrics_count_what_clients_got(cluster: Cluster, client: openai.OpenAI) -> None:
    before = scrape(f"{cluster.base_url}/metrics")
    reply = client.chat.completions.create(model=CHAT, messages=HI, max_tokens=5)
    streamed = list(
        client.chat.completions.create(
            model=CHAT,
            messages=HI,
            max_tokens=7,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Priority": "high"},
        )
    )
    client.embeddings.create(model=EMBED, input="hello")
    with contextlib.suppress(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)
    after = scrape(f"{cluster.base_url}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = {"endpoint": "chat", "model": CHAT}
    assert grew("corral_requests_total", **chat, priority="normal", status="200") == 1
    assert grew("corral_requests_total", **chat, priority="high", status="200") == 1
    assert grew("corral_requests_total", endpoint="embedding", model=EMBED, status="200") == 1
    assert grew("corral_requests_total", endpoint="chat", model="unknown", status="404") == 1
    assert grew("corral_request_duration_seconds_count", **chat) == 2
    assert grew("corral_time_to_first_token_seconds_count", **chat, priority="high") == 1
    assert grew("corral_time_to_first_token_seconds_count", **chat, priority="normal") == 0
    assert grew("corral_queue_wait_seconds_count", **chat) == 2  # both started on a worker
    assert grew("corral_queue_wait_seconds_count", endpoint="chat", model="unknown") == 0
    assert reply.usage is not None and streamed
    assert grew("corral_completion_tokens_total", **chat) == reply.usage.completion_tokens + 7
    assert (
        grew("corral_prompt_tokens_total", **chat, priority="normal") == reply.usage.prompt_tokens
    )
    for priority in ("high", "normal", "low", "batch"):
        assert (
            "corral_queue_depth_requests",
            frozenset({("model", CHAT), ("priority", priority)}),
        ) in after
    assert value(after, "corral_workers", model=CHAT, state="ready") == 1
    assert ("corral_active_streams", frozenset()) in after


def test_worker_serves_its_own_metrics(cluster: Cluster, client: openai.OpenAI) -> None:
    # Enough tokens for llama-server's generation clock, which counts whole milliseconds
    client.chat.completions.create(model=CHAT, messages=HI, max_tokens=400)
    (worker,) = workers(cluster.redis_url, CHAT)
    assert worker.metrics_port
    found = scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    me = {"worker": worker.id, "model": CHAT}
    assert value(found, "corral_worker_slots", **me) == 2
    assert value(found, "corral_worker_busy_slots", **me) == 0
    assert value(found, "corral_worker_model_state", **me, state="ready") == 1
    assert value(found, "corral_worker_model_state", **me, state="loading") == 0
    assert value(found, "corral_worker_generated_tokens_total", **me) >= 8
    assert value(found, "corral_worker_prompt_tokens_total", **me) > 0
    assert value(found, "corral_worker_tokens_per_second", **me) > 0
    assert value(found, "corral_worker_memory_used_bytes", **me) > 2**20
    assert value(found, "corral_worker_model_load_seconds_count", **me) == 1
    assert value(found, "corral_worker_restarts_total", **me) == 0

    targets = httpx.get(f"{cluster.base_url}/metrics/targets", timeout=10).json()
    # where its /metrics listens (127.0.0.1 by default), not its host name (issue 24)
    assert {"targets": [f"127.0.0.1:{worker.metrics_port}"], "labels": me} in targets


def test_a_leaving_workers_series_disappear(
    cluster: Cluster, model_dir: Path, tmp_path: Path
) -> None:
    extra = corral_child(
        "extra",
        ["worker", "--model", str(model_dir / f"{EMBED}.gguf"), "--embedding", "--slots", "1"],
        tmp_path / "extra.log",
        CORRAL_REDIS_URL=cluster.redis_url,
    )
    extra.start()
    try:
        assert wait_for(
            lambda: any(
                w.pid == extra.pid and w.state == "ready" for w in workers(cluster.redis_url)
            ),
            60,
            0.1,
        )
        (info,) = [w for w in workers(cluster.redis_url) if w.pid == extra.pid]
        url = f"http://127.0.0.1:{info.metrics_port}/metrics"
        assert value(scrape(url), "corral_worker_slots", worker=info.id) == 1
        target = f"127.0.0.1:{info.metrics_port}"

        def listed() -> bool:
            found = httpx.get(f"{cluster.base_url}/metrics/targets", timeout=10).json()
            return any(target in t["targets"] for t in found)

        assert listed()
    finally:
        extra.stop(grace=10)
    # gone from the targets (at once, or when its heartbeat key expires): Prometheus stops
    # scraping it, and its series go stale and disappear
    assert wait_for(lambda: not listed(), 5, 0.2)
    try:
        httpx.get(url, timeout=2)
        raise AssertionError("the worker's metrics server outlived it")
    except httpx.TransportError:
        pass


def test_request_id_on_every_log_line_of_a_request(cluster: Cluster) -> None:
    r = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        timeout=30,
        json={"model": CHAT, "messages": HI, "max_tokens": 2},
        headers={"X-Request-ID": "client-trace-42"},
    )
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    assert rid.startswith("req_")  # ours, not the client's: it names the Celery task

    def lines_about(name: str) -> list[str]:
        text = (cluster.log_dir / name).read_text(errors="replace")
        return [line for line in text.splitlines() if rid in line]

    assert wait_for(lambda: any("finished" in line for line in lines_about("worker0.log")), 5)
    gateway, worker = lines_about("gateway.log"), lines_about("worker0.log")
    assert gateway and worker
    for line in gateway:
        assert re.search(rf" request={rid} client_request=client-trace-42$", line), line
    for line in worker:
        if "received" in line:  # the consumer's own line, before the task runs
            continue
        assert line.endswith(f" request={rid}"), line
