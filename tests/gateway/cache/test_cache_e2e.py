"""The response cache end to end, on real parts: a gateway with keys (two tenants), a
worker whose model has `cache` on, a Valkey of their own.

"Answered from the cache" is checked where the work would show: no request record nor
recent-requests entry for the hit's id (it was never enqueued), the model's telemetry
(requests its workers ended) and the worker's own token counters unchanged, and the
gateway's hit counter up by one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from common import redis_keys
from corral.tinymodel import make_model
from tests.conftest import CHAT, Cluster, configured_cluster
from tests.gateway.helpers import ADMIN_KEY, add_key, bearer, client, samples, value
from tests.support import wait_for, workers

pytestmark = pytest.mark.slow  # every test here runs Corral processes

MODEL = "cached"
ADMIN = bearer(ADMIN_KEY)


@pytest.fixture(scope="module")
def cc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cache")
    config: dict[str, Any] = {
        "models": {
            MODEL: {
                "model_path": str(make_model(root / "cached.gguf", seed=3)),
                "ctx_size": 2048,
                "parallel": 2,
                "cache": {"ttl": 120, "max_entries": 50},
            }
        }
    }
    with configured_cluster(root, config, [["--model", MODEL]], CORRAL_ADMIN_KEY=ADMIN_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def tenants(cc: Cluster) -> tuple[openai.OpenAI, openai.OpenAI]:
    _, alice = add_key(cc.redis_url, "alice")
    _, bob = add_key(cc.redis_url, "bob")
    return client(cc.base_url, alice), client(cc.base_url, bob)


class Work:
    """What running a request leaves behind: telemetry, worker tokens, cache counters."""

    def __init__(self, cc: Cluster) -> None:
        telemetry = httpx.get(f"{cc.base_url}/v1/telemetry", headers=ADMIN, timeout=10).json()
        self.done = telemetry["models"][MODEL]["last_hour"]["done"]
        (info,) = workers(cc.redis_url, MODEL)
        page = httpx.get(f"http://127.0.0.1:{info.metrics_port}/metrics", timeout=10).text
        self.prompt_tokens = value(samples(page), "corral_worker_prompt_tokens_total")
        gateway = samples(httpx.get(f"{cc.base_url}/metrics", headers=ADMIN, timeout=10).text)
        self.hits = value(gateway, "corral_cache_hits_total", model=MODEL)
        self.stores = value(gateway, "corral_cache_stores_total", model=MODEL)


def never_queued(cc: Cluster, request_id: str) -> bool:
    record = httpx.get(f"{cc.base_url}/v1/requests/{request_id}", headers=ADMIN, timeout=10)
    r = redis.Redis.from_url(cc.redis_url, decode_responses=True)
    try:
        recent = r.lrange(redis_keys.RECENT_REQUESTS, 0, -1)
    finally:
        r.close()
    return record.status_code == 404 and request_id not in recent


def kept(cc: Cluster, stores: float) -> None:
    """Until the gateway has kept one more reply (it does so after replying)."""
    assert wait_for(lambda: Work(cc).stores > stores, 5, 0.05), cc.logs()


def missed(cc: Cluster, api: openai.OpenAI, content: str, **kw: Any) -> tuple[Any, Work]:
    """Ask for the first time: a miss that a worker runs and the gateway keeps; the reply,
    and the work done once it is kept."""
    before = Work(cc)
    first = ask(api, content, **kw)
    assert first.headers["x-corral-cache"] == "miss"
    kept(cc, before.stores)
    ran = Work(cc)
    assert ran.done == before.done + 1 and ran.prompt_tokens > before.prompt_tokens
    return first, ran


def untouched(cc: Cluster, ran: Work, hits: int) -> None:
    """Since `ran`: no request ended on a worker, no prompt token read, `hits` hits."""
    after = Work(cc)
    assert (after.done, after.prompt_tokens) == (ran.done, ran.prompt_tokens)
    assert after.hits == ran.hits + hits


def ask(api: openai.OpenAI, content: str, **kw: Any) -> Any:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": content}]
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)


def streamed(raw: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)


def test_repeated_temperature_0_request_is_answered_from_the_cache(
    cc: Cluster, tenants: tuple[openai.OpenAI, openai.OpenAI]
) -> None:
    alice, _ = tenants
    first, ran = missed(cc, alice, "plain repeat")
    again = ask(alice, "plain repeat")
    assert again.headers["x-corral-cache"] == "hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert again.parse().usage == first.parse().usage
    assert never_queued(cc, again.headers["x-request-id"])
    untouched(cc, ran, hits=1)


def test_streamed_reply_is_kept_and_replayed_both_ways(
    cc: Cluster, tenants: tuple[openai.OpenAI, openai.OpenAI]
) -> None:
    alice, _ = tenants
    usage = {"include_usage": True}
    first, ran = missed(cc, alice, "stream repeat", stream=True, stream_options=usage)
    text = streamed(first)
    assert text
    replay = ask(alice, "stream repeat", stream=True, stream_options=usage)
    assert replay.headers["x-corral-cache"] == "hit"
    assert replay.headers["content-type"].startswith("text/event-stream")
    chunks = list(replay.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    whole = ask(alice, "stream repeat")  # the same entry answers a non-streaming request
    assert whole.headers["x-corral-cache"] == "hit"
    assert whole.parse().choices[0].message.content == text
    assert never_queued(cc, replay.headers["x-request-id"])
    untouched(cc, ran, hits=2)


def test_another_tenants_identical_request_misses(
    cc: Cluster, tenants: tuple[openai.OpenAI, openai.OpenAI]
) -> None:
    alice, bob = tenants
    missed(cc, alice, "tenant repeat")
    missed(cc, bob, "tenant repeat")  # alice's reply is not bob's
    assert ask(bob, "tenant repeat").headers["x-corral-cache"] == "hit"  # bob's own now
    assert ask(alice, "tenant repeat").headers["x-corral-cache"] == "hit"


def test_no_cache_and_no_store_are_respected(
    cc: Cluster, tenants: tuple[openai.OpenAI, openai.OpenAI]
) -> None:
    alice, _ = tenants
    _, ran = missed(cc, alice, "directives")
    fresh = ask(alice, "directives", extra_headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-corral-cache"] == "miss"
    assert Work(cc).done == ran.done + 1  # a worker ran it again
    unkept = ask(alice, "not kept", extra_headers={"Cache-Control": "no-store"})
    assert unkept.headers["x-corral-cache"] == "miss"
    time.sleep(0.3)  # a fill would be under way by now
    assert ask(alice, "not kept").headers["x-corral-cache"] == "miss"


def test_only_requests_their_input_decides_are_kept(
    cc: Cluster, tenants: tuple[openai.OpenAI, openai.OpenAI]
) -> None:
    alice, _ = tenants
    before = Work(cc)
    assert ask(alice, "sampled", temperature=0.8).headers["x-corral-cache"] == "miss"
    assert ask(alice, "sampled", temperature=0.8).headers["x-corral-cache"] == "miss"
    time.sleep(0.3)  # a fill would be under way by now
    assert Work(cc).stores == before.stores
    assert ask(alice, "seeded", temperature=0.8, seed=7).headers["x-corral-cache"] == "miss"
    kept(cc, before.stores)
    assert ask(alice, "seeded", temperature=0.8, seed=7).headers["x-corral-cache"] == "hit"
    assert ask(alice, "seeded", temperature=0.8, seed=8).headers["x-corral-cache"] == "miss"


def test_cache_is_off_by_default(client: openai.OpenAI) -> None:
    """The shared cluster's model has no `cache`: no header, nothing kept."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=messages, temperature=0, max_tokens=2
        )
        assert "x-corral-cache" not in raw.headers
