"""The models this cluster serves: the gateway's own config plus what workers announced
in Redis (`corral:catalog`), so a gateway on another machine knows them too.

Every generation request looks its model up here, so announced entries are kept for a
second (`CACHE_S`) rather than read from Redis each time: an entry changes only when a
worker restarts with another config, and a second's delay in seeing that is harmless.
A model not found is never cached, so a model announced a moment ago is found at once."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from common import redis_keys
from common.errors import ModelNotFound
from common.settings import ModelConfig, Settings

CACHE_S = 1.0


class Catalog:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._cache: dict[str, tuple[ModelConfig, float]] = {}  # alias -> (config, read at)

    async def publish_config(self) -> None:
        """Announce the models of this gateway's config to the cluster."""
        if not self._settings.models:
            return
        await self._redis.hset(
            redis_keys.CATALOG,
            mapping={
                alias: self._settings.resolved(m).model_dump_json()
                for alias, m in self._settings.models.items()
            },
        )

    async def get(self, alias: str) -> ModelConfig:
        model = self._settings.models.get(alias)
        if model is not None:
            return model
        cached = self._cache.get(alias)
        if cached is not None and time.monotonic() - cached[1] < CACHE_S:
            return cached[0]
        raw = await self._redis.hget(redis_keys.CATALOG, alias)
        if raw is None:
            self._cache.pop(alias, None)
            raise ModelNotFound(alias)
        model = ModelConfig.model_validate_json(raw)
        self._cache[alias] = (model, time.monotonic())
        return model

    async def all(self) -> dict[str, ModelConfig]:
        raw = await self._redis.hgetall(redis_keys.CATALOG)
        models = {str(k): ModelConfig.model_validate_json(v) for k, v in raw.items()}
        models.update(self._settings.models)
        return dict(sorted(models.items()))
