"""The gateway's error replies (`gateway.errors`): Redis out of reach mid-request (a
restart, a Sentinel failover) is a 503 in the OpenAI envelope with Retry-After, not a 500."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import errors


def test_redis_unreachable_is_a_503_to_retry() -> None:
    app = FastAPI()
    errors.install(app)

    @app.get("/x")
    async def x() -> None:
        raise RedisConnectionError("No master found for 'corral'")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/x")

    reply = asyncio.run(call())
    assert reply.status_code == 503 and reply.headers["retry-after"] == "2"
    error = reply.json()["error"]
    assert error["code"] == "redis_unavailable" and error["type"] and error["message"]
