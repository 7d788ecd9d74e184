"""The response cache in Redis: one lookup before a request is queued, one fill after its
reply was relayed whole.

A model whose `cache` is off costs nothing here (no Redis call); one whose cache is on
costs one GET before the request is queued. A hit is answered at once (JSON, or replayed
as SSE) and never reaches a queue, a worker or a placement; a miss goes on as any request
and its whole reply is kept in the background once relayed (`FILL_LUA`: the entry with its
TTL, and the model's index of entries trimmed to `max_entries`, oldest first — the broker's
Redis runs `noeviction`, so the cache bounds itself). Replies larger than
`max_entry_bytes`, failed or cut short are not kept. Redis trouble makes a miss, never an
error. Every reply of a model whose cache is on says `x-corral-cache: hit` or `miss`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from common import redis_keys
from common.assembly import Assembler
from common.jobs import JobKind
from common.settings import CacheConfig, ModelConfig
from gateway.cache.policy import Directive, cacheable, directive, entry_key, identity
from gateway.cache.replies import replay_events
from gateway.monitoring.metrics import GatewayMetrics
from gateway.tenancy.ownership import caller_of

log = logging.getLogger(__name__)

HEADER = "x-corral-cache"
IDENTITY_S = 2.0  # a model's identity (its file's version) is looked at this often

# KEYS: the entry, the model's index of entries. ARGV: the reply, TTL (ms), now (ms), how
# many entries the model may keep. Returns how many old entries went.
FILL_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
else
  over = 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return over
"""

Keep = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Lookup:
    """What the cache said about one request: its header, the kept reply if it was a hit,
    and how to keep the new reply if it was a miss that may be kept."""

    kind: JobKind
    headers: dict[str, str] = field(default_factory=dict)
    hit: dict[str, Any] | None = None
    keep: Keep | None = None  # a non-streaming reply, once whole
    limit: int = 0  # the most a kept reply may weigh (bytes)

    def reply(self, stream: bool, include_usage: bool, headers: dict[str, str]) -> Response:
        """The kept reply, as the request asked for it."""
        assert self.hit is not None
        if stream and self.kind is not JobKind.EMBEDDING:
            body = replay_events(self.kind, self.hit, include_usage)
            sse = {**headers, "cache-control": "no-cache"}
            return Response(body, media_type="text/event-stream", headers=sse)
        return JSONResponse(self.hit, headers=headers)

    def tap(self) -> StreamFill | None:
        """What watches a stream to keep its reply (`gateway.streaming.sse.Tap`)."""
        if self.keep is None or self.kind is JobKind.EMBEDDING:
            return None
        return StreamFill(self.kind, self.limit, self.keep)


class StreamFill:
    """Assembles a relayed stream and keeps it if it ended well (every choice finished),
    giving up at once on one larger than `limit` bytes."""

    def __init__(self, kind: JobKind, limit: int, keep: Keep) -> None:
        self._assembler: Assembler | None = Assembler(kind)
        self._left = limit
        self._keep = keep

    def add(self, chunks: list[str]) -> None:
        if self._assembler is None:
            return
        self._left -= sum(len(c) for c in chunks)
        if self._left < 0:
            self._assembler = None  # too large to keep: stop assembling it
            return
        self._assembler.add(*chunks)

    def done(self, usage: dict[str, Any] | None) -> None:
        if self._assembler is not None and self._assembler.finished:
            self._keep(self._assembler.reply(usage))


class ResponseCache:
    def __init__(self, client: aioredis.Redis, metrics: GatewayMetrics) -> None:
        self._redis = client
        self._fill = client.register_script(FILL_LUA)
        self._metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()
        self._identities: dict[str, tuple[str, str, float]] = {}  # alias -> config, id, at

    async def lookup(
        self, request: Request, alias: str, model: ModelConfig, kind: JobKind, body: dict[str, Any]
    ) -> Lookup:
        """Look the request up (`body`: as the worker would get it, defaults applied)."""
        config = model.cache
        if config is None:
            return Lookup(kind)
        how = directive(request.headers.get("cache-control"))
        if how is Directive.BYPASS or not cacheable(kind, body):
            return self._missed(alias, kind)
        digest = entry_key(self._identity(alias, model), kind, body, caller_of(request).owner)
        key = redis_keys.cache_key(alias, digest)
        kept = await self._get(key) if how is Directive.USE else None
        if kept is not None:
            self._metrics.cache_hits.labels(model=alias).inc()
            log.info("job=%s model=%s answered from the cache", request.state.request_id, alias)
            return Lookup(kind, {HEADER: "hit"}, hit=kept)

        def keep(reply: dict[str, Any]) -> None:
            self._store(alias, key, config, reply)

        return self._missed(alias, kind, keep, config.max_entry_bytes)

    def _missed(
        self, alias: str, kind: JobKind, keep: Keep | None = None, limit: int = 0
    ) -> Lookup:
        self._metrics.cache_misses.labels(model=alias).inc()
        return Lookup(kind, {HEADER: "miss"}, keep=keep, limit=limit)

    def _identity(self, alias: str, model: ModelConfig) -> str:
        """The model's identity, looked at again every `IDENTITY_S` (a `stat` of its file)."""
        now = time.monotonic()
        shown = model.model_dump_json()
        known = self._identities.get(alias)
        if known is not None and known[0] == shown and now - known[2] < IDENTITY_S:
            return known[1]
        found = identity(alias, model)
        self._identities[alias] = (shown, found, now)
        return found

    async def _get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            log.warning("response cache unreadable, answering without it: %r", exc)
            return None
        if raw is None:
            return None
        try:
            kept: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return kept

    def _store(self, alias: str, key: str, config: CacheConfig, reply: dict[str, Any]) -> None:
        """Keep `reply` in the background: the client has it already."""
        value = json.dumps(reply, separators=(",", ":"))
        if len(value.encode()) > config.max_entry_bytes:
            log.debug("model=%s reply of %d bytes not cached (max_entry_bytes)", alias, len(value))
            return
        task = asyncio.create_task(self._write(alias, key, config, value))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, alias: str, key: str, config: CacheConfig, value: str) -> None:
        ttl_ms = int(config.ttl * 1000)
        args: list[str | int] = [value, ttl_ms, int(time.time() * 1000), config.max_entries]
        try:
            await self._fill(keys=[key, redis_keys.cache_index(alias)], args=args)
        except RedisError as exc:
            log.warning("model=%s reply not cached: %r", alias, exc)
            return
        self._metrics.cache_stores.labels(model=alias).inc()

    async def stop(self) -> None:
        """Let the fills under way finish (a second at most)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=1.0)
