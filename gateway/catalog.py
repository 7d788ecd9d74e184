"""The models this cluster serves: the gateway's own config plus what workers announced
in Redis (`corral:catalog`), so a gateway on another machine knows them too."""

from __future__ import annotations

import redis.asyncio as aioredis

from common import keys
from common.errors import ModelNotFound
from common.settings import ModelConfig, Settings


class Catalog:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client

    async def publish_config(self) -> None:
        """Announce the models of this gateway's config to the cluster."""
        if not self._settings.models:
            return
        await self._redis.hset(
            keys.CATALOG,
            mapping={
                alias: m.model_copy(
                    update={"model_path": self._settings.resolve_model_path(m)}
                ).model_dump_json()
                for alias, m in self._settings.models.items()
            },
        )

    async def get(self, alias: str) -> ModelConfig:
        model = self._settings.models.get(alias)
        if model is not None:
            return model
        raw = await self._redis.hget(keys.CATALOG, alias)
        if raw is None:
            raise ModelNotFound(alias)
        return ModelConfig.model_validate_json(raw)

    async def all(self) -> dict[str, ModelConfig]:
        raw = await self._redis.hgetall(keys.CATALOG)
        models = {str(k): ModelConfig.model_validate_json(v) for k, v in raw.items()}
        models.update(self._settings.models)
        return dict(sorted(models.items()))
