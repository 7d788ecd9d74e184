"""The models this cluster serves, as the running configs say: each gateway's own models
(its config file over the GGUFs found under its `models_dir`) plus what workers started with
`--model` announced, all in Redis (`redis_keys.CATALOG`) so a gateway on another machine
knows them too.

A gateway announces its own models at start and every few seconds (`announce`, with the
time in `redis_keys.CATALOG_SEEN`; a worker marks the model it holds there at each
heartbeat); an entry that nobody has announced for `STALE_S` and that no live worker holds
leaves the catalog (`prune`): a model from an earlier run's config
is gone, and a request for it is a 404 at once rather than a wait for a load nobody can do.

Every generation request looks its model up here, so entries read from Redis (with the
request defaults an admin set at run time, `redis_keys.MODEL_DEFAULTS`) are kept for a
second (`CACHE_S`). A model not found is never cached, so one announced a moment ago is
found at once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from common import redis_keys
from common.discovery import discover, signature
from common.errors import InvalidRequest, ModelNotFound
from common.settings import ModelConfig, Settings
from gateway.aio import Shared

log = logging.getLogger(__name__)

CACHE_S = 1.0
STALE_S = 30.0  # unannounced this long and held by no live worker: gone from the catalog
REWRITE_S = 30.0  # an announcement rewrites the entries themselves this often


class Catalog:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._cache: dict[str, tuple[ModelConfig, float]] = {}  # alias -> (config, read at)
        self._shared_read = Shared(self._read)
        self._own: dict[str, ModelConfig] = {}  # this gateway's models, paths resolved
        self._scanned: tuple[tuple[str, int, int], ...] | None = None
        self._written = 0.0  # when the entries themselves were last written
        self.rescan()

    @property
    def models_dir(self) -> Path:
        return self._settings.models_dir or self._settings.data_dir / "models"

    def rescan(self) -> bool:
        """Read `models_dir` again if its GGUFs changed; True if they did."""
        now = signature(self.models_dir)
        if now == self._scanned:
            return False
        self._scanned = now
        found = discover(self.models_dir)
        own = {a: self._settings.resolved(m) for a, m in found.items()}
        for alias, model in self._settings.models.items():
            model = self._settings.resolved(model)
            if not model.model_path.exists() and alias in found:  # named in the config
                model = model.model_copy(update={"model_path": found[alias].model_path})
            if model.mmproj is None and alias in found:
                model = model.model_copy(update={"mmproj": found[alias].mmproj})
            own[alias] = model
        added = sorted(set(own) - set(self._own))
        if added and self._own:
            log.info("models_dir %s: new model(s) %s", self.models_dir, ", ".join(added))
        self._own = own
        self._cache.clear()
        self._written = 0.0
        return True

    @property
    def own(self) -> dict[str, ModelConfig]:
        return dict(self._own)

    async def announce(self) -> None:
        """Announce this gateway's models to the cluster (again: each announcement keeps
        them from being pruned)."""
        if not self._own:
            return
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        if now - self._written > REWRITE_S:  # the entries rarely change: the time always does
            pipe.hset(
                redis_keys.CATALOG, mapping={a: m.model_dump_json() for a, m in self._own.items()}
            )
        pipe.zadd(redis_keys.CATALOG_SEEN, dict.fromkeys(self._own, now))
        await pipe.execute()
        self._written = self._written if now - self._written <= REWRITE_S else now

    async def prune(self, held: set[str]) -> list[str]:
        """Drop entries nobody announced for `STALE_S` that no live worker holds (`held`)."""
        aliases = [str(a) for a in await self._redis.hkeys(redis_keys.CATALOG)]
        if not aliases:
            return []
        seen = await self._redis.zmscore(redis_keys.CATALOG_SEEN, aliases)
        cutoff = time.time() - STALE_S
        gone = [
            a
            for a, at in zip(aliases, seen, strict=True)
            if a not in self._own and a not in held and (at is None or at < cutoff)
        ]
        if gone:
            await self._forget(gone)
            log.info("catalog: %s announced by nobody and held by no worker: removed", gone)
        return gone

    async def remove(self, alias: str) -> None:
        """`corral models rm`: forget a model announced elsewhere (an earlier config)."""
        if alias in self._own:
            where = "delete its file" if alias not in self._settings.models else "its config"
            raise InvalidRequest(
                f"The model {alias!r} is in this gateway's own models: remove it from {where}.",
                param="model",
                code="model_configured",
            )
        if not await self._redis.hexists(redis_keys.CATALOG, alias):
            raise ModelNotFound(alias)
        await self._forget([alias])

    async def _forget(self, aliases: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hdel(redis_keys.CATALOG, *aliases)
        pipe.zrem(redis_keys.CATALOG_SEEN, *aliases)
        pipe.hdel(redis_keys.MODEL_DEFAULTS, *aliases)
        await pipe.execute()
        for alias in aliases:
            self._cache.pop(alias, None)

    async def get(self, alias: str) -> ModelConfig:
        cached = self._cache.get(alias)
        if cached is not None and time.monotonic() - cached[1] < CACHE_S:
            return cached[0]
        return await self._shared_read(alias)  # a burst's requests share one read

    async def _read(self, alias: str) -> ModelConfig:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(redis_keys.CATALOG, alias)
        pipe.hget(redis_keys.MODEL_DEFAULTS, alias)
        raw, overrides = await pipe.execute()
        model = self._own.get(alias)
        if model is None and raw is None:
            self._cache.pop(alias, None)
            raise ModelNotFound(alias)
        if model is None:
            model = ModelConfig.model_validate_json(raw)
        if overrides:
            model = model.model_copy(
                update={"defaults": {**model.defaults, **json.loads(overrides)}}
            )
        self._cache[alias] = (model, time.monotonic())
        return model

    async def all(self) -> dict[str, ModelConfig]:
        raw = await self._redis.hgetall(redis_keys.CATALOG)
        models = {str(k): ModelConfig.model_validate_json(v) for k, v in raw.items()}
        models.update(self._own)
        return dict(sorted(models.items()))

    async def set_defaults(self, alias: str, defaults: dict[str, Any]) -> ModelConfig:
        """Replace the request defaults set at run time for `alias` ({}: none), over its
        config's own."""
        await self.get(alias)  # 404 if unknown
        if defaults:
            await self._redis.hset(redis_keys.MODEL_DEFAULTS, alias, json.dumps(defaults))
        else:
            await self._redis.hdel(redis_keys.MODEL_DEFAULTS, alias)
        self._cache.pop(alias, None)
        return await self.get(alias)
