"""The gateway process's long-lived parts, built once in the app's lifespan."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.settings import Settings
from gateway.catalog import Catalog
from gateway.dispatch import Dispatcher
from gateway.stream import StreamHub


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    hub: StreamHub
    dispatcher: Dispatcher
    catalog: Catalog

    @classmethod
    async def start(cls, settings: Settings) -> GatewayState:
        url = settings.require_redis_url()
        client = aioredis.Redis.from_url(url, health_check_interval=30, decode_responses=True)
        await client.ping()
        hub = StreamHub(client, f"gw-{uuid.uuid4().hex[:8]}")
        await hub.start()
        dispatcher = Dispatcher(settings, url, client)
        state = cls(settings, client, hub, dispatcher, Catalog(settings, client))
        await state.catalog.publish_config()
        return state

    async def stop(self) -> None:
        await self.hub.stop()
        self.dispatcher.close()
        await self.redis.aclose()
