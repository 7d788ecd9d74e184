"""Per-key rate limits: the bucket math on a real Valkey with a fixed clock, then
limits reached and reset through a real gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from common import redis_keys
from common.apikeys import issue
from corral.redis_server import EmbeddedRedis
from gateway.tenancy.ratelimit import Decision, RateLimiter, decide, go_duration
from tests.conftest import CHAT, EMBED, Cluster
from tests.gateway.helpers import (
    ADMIN_KEY,
    add_key,
    assert_envelope,
    bearer,
    samples,
    value,
)
from tests.support import wait_for

HI = [{"role": "user", "content": "Hello there"}]
pytestmark = pytest.mark.usefixtures("no_keys_left")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0.0001, "1ms"),
        (0, "0ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3725, "1h2m5s"),
    ],
)
def test_go_duration_matches_openai_headers(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_headers_name_both_dimensions() -> None:
    key, _ = issue("k", rpm=60, tpm=600)
    d = decide(key, True, "", "59", "-20")
    assert d.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m2s",
    }
    refused = decide(key, False, "tokens", "60", "-20")
    assert refused.limited_by == "tokens" and refused.retry_after == pytest.approx(2.1)
    assert refused.headers["Retry-After"] == "3"


T = TypeVar("T")


def _limiter(url: str, body: Callable[[RateLimiter], Awaitable[T]]) -> T:
    async def run() -> T:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await body(RateLimiter(client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_requests_bucket_bursts_then_refills(redis_server: EmbeddedRedis) -> None:
    key, _ = issue("burst", rpm=3)

    async def body(rl: RateLimiter) -> list[Decision]:
        t0 = 1_000_000.0
        got = [await rl.admit(key, now=t0) for _ in range(4)]
        later = await rl.admit(key, now=t0 + 20)  # 3 per minute: one back every 20 s
        return [*got, later]

    a, b, c, refused, later = _limiter(redis_server.url, body)
    assert [d.allowed for d in (a, b, c)] == [True] * 3
    assert [d.headers["x-ratelimit-remaining-requests"] for d in (a, b, c)] == ["2", "1", "0"]
    assert not refused.allowed and refused.limited_by == "requests"
    assert refused.retry_after == pytest.approx(20) and refused.headers["Retry-After"] == "20"
    assert later.allowed and later.headers["x-ratelimit-remaining-requests"] == "0"
    r = redis.Redis.from_url(redis_server.url)
    assert 0 < r.pttl(redis_keys.ratelimit_key(key.id, "requests")) <= 61_000  # gone once refilled
    r.close()


def test_token_debt_holds_requests_back_until_repaid(redis_server: EmbeddedRedis) -> None:
    key, _ = issue("debt", tpm=60)  # one token back per second

    async def body(rl: RateLimiter) -> list[Decision]:
        t0 = 2_000_000.0
        first = await rl.admit(key, now=t0)
        await rl.charge(key, 90, now=t0)  # 30 tokens into debt
        held = await rl.admit(key, now=t0 + 10)
        free = await rl.admit(key, now=t0 + 31)
        return [first, held, free]

    first, held, free = _limiter(redis_server.url, body)
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "60"
    assert not held.allowed and held.limited_by == "tokens"
    assert (
        held.retry_after == pytest.approx(21)
        and held.headers["x-ratelimit-remaining-tokens"] == "0"
    )
    assert free.allowed


def test_request_limit_reached_then_reset(gw: Cluster) -> None:
    """Generation requests count, and only those that run: a listing, a request for a
    model the key may not use (403) and a bad body (400) take nothing."""
    _, secret = add_key(gw.redis_url, "rpm-test", rpm=30, models=[CHAT])  # 30, then 1 per 2 s
    body = {"model": CHAT, "messages": HI, "max_tokens": 1}
    with httpx.Client(base_url=gw.base_url, headers=bearer(secret), timeout=10) as http:
        for _ in range(10):
            assert http.get("/v1/models").status_code == 200
            other = http.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
            assert other.status_code == 403, other.text
            assert http.post("/v1/chat/completions", json={"model": CHAT}).status_code == 400
        for ran in range(100):  # noqa: B007 (bounded: the bucket empties well within)
            r = http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                break
            assert r.headers["x-ratelimit-limit-requests"] == "30"
        assert ran == 30, "only the 30 that ran counted"
        assert_envelope(r, 429, "rate_limit_error", "rate_limit_requests")
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        reset = r.headers["x-ratelimit-reset-requests"]
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 2
        message = r.json()["error"]["message"]  # says what the headers say
        assert f"Retry in {wait} s" in message and f"whole again in {reset}" in message
        assert http.get("/v1/models").status_code == 200  # listings are not limited
        time.sleep(wait + 0.1)  # the bucket has refilled one request by then
        again = http.post("/v1/chat/completions", json=body)
        assert again.status_code == 200, again.text


def test_token_limit_counts_real_usage(gw: Cluster) -> None:
    _, secret = add_key(gw.redis_url, "tpm-test", tpm=40)
    body = {"model": CHAT, "messages": HI, "max_tokens": 16, "ignore_eos": True}
    with httpx.Client(base_url=gw.base_url, headers=bearer(secret), timeout=30) as http:
        before = samples(http.get("/metrics", headers=bearer(ADMIN_KEY)).text)
        seen = []
        for _ in range(4):
            r = http.post("/v1/chat/completions", json=body)
            seen.append(r.status_code)
            if r.status_code == 429:
                break
        assert seen[0] == 200 and seen[-1] == 429, seen
        assert_envelope(r, 429, "rate_limit_error", "rate_limit_tokens")
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(r.headers["Retry-After"]) >= 1
        scraped = samples(http.get("/metrics", headers=bearer(ADMIN_KEY)).text)
    rejected = value(scraped, "corral_ratelimit_rejections_total", key="tpm-test", limit="tokens")
    assert rejected == 1
    # the 429 is counted under its model, not `unknown` (the module's other tests had theirs)
    for model, more in ((CHAT, 1), ("unknown", 0)):
        counted = [
            value(m, "corral_requests_total", model=model, status="429") for m in (before, scraped)
        ]
        assert counted[1] - counted[0] == more, (model, counted)


def test_a_stream_cut_short_is_charged_what_it_was_sent(gw: Cluster) -> None:
    """A client that drops its stream before the end still used tokens: its key is charged
    the chunks it was sent (it used to be charged nothing, so never-finished streams were
    free of any token limit)."""
    _, secret = add_key(gw.redis_url, "tpm-cut", tpm=600)  # refills 10 tokens a second
    body = {"model": CHAT, "messages": HI, "max_tokens": 6000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=gw.base_url, headers=bearer(secret), timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = (x for x in resp.iter_lines() if x.startswith("data: {"))
            got = [next(lines) for _ in range(200)]
        assert len(got) == 200

        def remaining() -> int:  # a bad body: refused (nothing charged), with the headers
            bad = http.post("/v1/chat/completions", json={"model": CHAT})
            return int(bad.headers["x-ratelimit-remaining-tokens"])

        assert wait_for(lambda: remaining() <= 600 - 150, 5), remaining()
