"""The gateway's reads of the per-model request telemetry workers write in Redis
(`common.telemetry`): recent speeds for the model status, the last minute and hour for
`GET /v1/telemetry`, the mean service time for queue ETAs. Every gateway reads the same
buckets, so they all agree. Each read is one pipelined round trip."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from common.telemetry import Summary, window_keys

# name -> (bucket span s, buckets): each window's buckets, the current one included.
RECENT = (60, 5)  # the window of `speed` in the model status, and of ETAs' service times
LAST_MINUTE = (10, 6)
LAST_HOUR = (60, 60)


async def summaries(
    client: aioredis.Redis, models: list[str], windows: dict[str, tuple[int, int]]
) -> dict[str, dict[str, Summary]]:
    """Per model and window name: the window's buckets summed."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    plan: list[tuple[str, str, int]] = []
    for model in models:
        for name, (span, count) in windows.items():
            keys = window_keys(model, span, count, now)
            plan.append((model, name, len(keys)))
            for key in keys:
                pipe.hgetall(key)
    replies = iter(await pipe.execute()) if plan else iter(())
    out: dict[str, dict[str, Summary]] = {m: {} for m in models}
    for model, name, count in plan:
        out[model][name] = Summary.of(next(replies) for _ in range(count))
    return out


async def speeds(client: aioredis.Redis, models: list[str]) -> dict[str, dict[str, Any]]:
    """Per model: requests ended and llama-server's prompt and generation tokens/s over the
    recent window."""
    found = await summaries(client, models, {"recent": RECENT})
    window = RECENT[0] * RECENT[1]
    return {m: {"window_s": window, **s["recent"].speed()} for m, s in found.items()}


async def report(client: aioredis.Redis, models: list[str]) -> dict[str, Any]:
    """`GET /v1/telemetry`: per model, the last minute and the last hour."""
    found = await summaries(client, models, {"last_minute": LAST_MINUTE, "last_hour": LAST_HOUR})
    return {m: {name: s.report() for name, s in windows.items()} for m, windows in found.items()}


async def mean_service_s(client: aioredis.Redis, model: str) -> float | None:
    """`model`'s mean service time over the recent window, else over the last hour."""
    found = await summaries(client, [model], {"recent": RECENT})
    mean = found[model]["recent"].mean_service_s()
    if mean is None:
        found = await summaries(client, [model], {"hour": LAST_HOUR})
        mean = found[model]["hour"].mean_service_s()
    return mean
