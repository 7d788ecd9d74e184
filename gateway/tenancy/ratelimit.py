"""Per-key rate limits: requests and tokens per minute, as token buckets in Redis.

Each limited key has one bucket per dimension (`redis_keys.ratelimit_key`), holding up to the
per-minute limit and refilling at limit/60 per second: a key may burst to its limit, then
runs at the steady rate — OpenAI's own model, where `x-ratelimit-reset-*` is the time
until the bucket is full again. A request takes one from the requests bucket and is let in
only while the tokens bucket is above zero; when the reply is done its real usage (prompt +
completion tokens, known only then) is taken from the tokens bucket, which may go below
zero: the debt holds the next requests back until it is repaid.

One Lua script does a whole check (refill, test, take, store) atomically on Redis's clock,
so every gateway of the cluster shares the same buckets and never races another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from common import redis_keys
from common.apikeys import ApiKey

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm (0: unlimited), token cost (admit:
# -1, i.e. take one request and need tokens above zero; refund: -2, give one request back;
# charge: tokens to take), now (seconds; "" = Redis TIME).
# Returns {allowed, limited_by, requests level, tokens level}.
_SCRIPT = """
local now
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1e6 end
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local levels = {}
for i = 1, 2 do
  if limits[i] > 0 then
    local s = redis.call('HMGET', KEYS[i], 'level', 'ts')
    local level = tonumber(s[1]) or limits[i]
    local ts = tonumber(s[2]) or now
    levels[i] = math.min(limits[i], level + math.max(0, now - ts) * limits[i] / 60)
  end
end
local cost = tonumber(ARGV[3])
local allowed, limited_by = 1, ''
if cost == -2 then
  if levels[1] then levels[1] = math.min(limits[1], levels[1] + 1) end
elseif cost < 0 then
  if levels[1] and levels[1] < 1 then allowed, limited_by = 0, 'requests'
  elseif levels[2] and levels[2] < 1 then allowed, limited_by = 0, 'tokens'
  elseif levels[1] then levels[1] = levels[1] - 1 end
elseif levels[2] then levels[2] = levels[2] - cost end
for i = 1, 2 do
  if levels[i] then
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'ts', tostring(now))
    local full_ms = math.ceil((limits[i] - levels[i]) * 60000 / limits[i])
    redis.call('PEXPIRE', KEYS[i], full_ms + 1000)
  end
end
return {allowed, limited_by, tostring(levels[1] or ''), tostring(levels[2] or '')}
"""


def retry_seconds(retry_after: float) -> int:
    """Whole seconds before a refused request may succeed: `Retry-After`, and the message."""
    return max(1, math.ceil(retry_after))


def go_duration(seconds: float) -> str:
    """A duration the way OpenAI's `x-ratelimit-reset-*` headers write it: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


@dataclass
class Decision:
    """The outcome of admitting one request; `headers` go on its reply either way."""

    allowed: bool
    limited_by: str | None = None  # "requests" or "tokens" when refused
    retry_after: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def decide(key: ApiKey, allowed: bool, limited_by: str, requests: str, tokens: str) -> Decision:
    """Turn the script's levels into OpenAI's headers (one trio per limited dimension)."""
    decision = Decision(allowed=allowed, limited_by=limited_by or None)
    for name, limit, raw in (("requests", key.rpm, requests), ("tokens", key.tpm, tokens)):
        if not limit or raw == "":
            continue
        level, per_s = float(raw), limit / 60
        decision.headers[f"x-ratelimit-limit-{name}"] = str(limit)
        decision.headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(level)))
        decision.headers[f"x-ratelimit-reset-{name}"] = go_duration((limit - level) / per_s)
        if name == limited_by:
            decision.retry_after = (1 - level) / per_s
    if not allowed:
        decision.headers["Retry-After"] = str(retry_seconds(decision.retry_after))
    return decision


class RateLimiter:
    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(_SCRIPT)

    async def _run(self, key: ApiKey, cost: float, now: float | None) -> list[str]:
        result = await self._script(
            keys=[
                redis_keys.ratelimit_key(key.id, "requests"),
                redis_keys.ratelimit_key(key.id, "tokens"),
            ],
            args=[key.rpm or 0, key.tpm or 0, cost, "" if now is None else repr(now)],
        )
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]

    async def admit(self, key: ApiKey, now: float | None = None) -> Decision:
        """Take one request from `key`'s budget, if its requests and tokens allow."""
        if not key.rpm and not key.tpm:
            return Decision(allowed=True)
        allowed, limited_by, requests, tokens = await self._run(key, -1, now)
        return decide(key, allowed == "1", limited_by, requests, tokens)

    async def refund(self, key: ApiKey, now: float | None = None) -> None:
        """Give back the request `admit` took, for one refused before it ran (a 403 for a
        model the key may not use, a bad body): only requests that run count."""
        if key.rpm:
            await self._run(key, -2, now)

    async def charge(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        """Take a finished request's real token usage from `key`'s tokens bucket."""
        if key.tpm and tokens > 0:
            await self._run(key, tokens, now)
