"""Request telemetry end to end on the shared cluster: requests served by a real worker and
llama-server show up, the same from any gateway, in `GET /v1/telemetry` (counts, tokens,
llama-server's speeds, TTFT and queue-wait percentiles), in the model's `speed` in
`GET /v1/models/status`, and in `corral status`."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import CHAT, Cluster

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


def _telemetry(base_url: str) -> dict[str, Any]:
    reply = httpx.get(f"{base_url}/v1/telemetry", timeout=10)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "telemetry" and body["windows_s"]["last_hour"] == 3600
    return dict(body["models"][CHAT])


def test_served_requests_show_in_telemetry_status_and_the_cli(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    before = _telemetry(cluster.base_url)["last_hour"]
    whole = client.chat.completions.create(model=CHAT, messages=HI, max_tokens=8)
    stream = client.chat.completions.create(
        model=CHAT, messages=HI, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    usages = [whole.usage] + [c.usage for c in stream if c.usage]
    tokens = sum(u.completion_tokens for u in usages if u)  # a random model may stop early

    after = _telemetry(cluster.base_url)
    hour, minute = after["last_hour"], after["last_minute"]
    assert hour["requests"] - before["requests"] == 2 == hour["done"] - before["done"]
    assert hour["completion_tokens"] - before["completion_tokens"] == tokens > 0
    assert minute["requests"] >= 2 and minute["prompt_tokens"] > 0
    for window in (minute, hour):
        assert window["gen_tokens_per_s"] > 0 and window["prompt_tokens_per_s"] > 0
        assert window["service_ms_mean"] > 0
        assert 0 < window["ttft_ms"]["p50"] <= window["ttft_ms"]["p99"]
        assert window["queue_wait_ms"]["p99"] >= window["queue_wait_ms"]["p50"] >= 0

    status = httpx.get(f"{cluster.base_url}/v1/models/status", timeout=10).json()
    speed = status["models"][CHAT]["speed"]
    assert speed["window_s"] == 300 and speed["requests"] >= 2 and speed["gen_tokens_per_s"] > 0

    out = subprocess.run(
        [sys.executable, "-m", "corral", "status", "--url", cluster.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "TOK/S prompt/gen" in out.stdout
    (row,) = [ln for ln in out.stdout.splitlines() if ln.startswith(f"{CHAT} ")]
    prompt, gen = row.split()[5].split("/")  # MODEL STATUS REPLICAS QUEUED BATCH TOK/S ON
    assert int(prompt) > 0 and int(gen) > 0, row
