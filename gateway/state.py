"""The gateway process's long-lived parts, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from common.settings import Settings
from gateway import owner_index
from gateway.aging import Promoter
from gateway.aio import cancel_and_wait
from gateway.batch_runner import BatchRunner
from gateway.batch_supervisor import BatchSupervisor
from gateway.batches import BatchStore
from gateway.catalog import Catalog
from gateway.dispatch import Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.placer import Placer
from gateway.status_feed import StatusFeed
from gateway.storage import RedisFileStore
from gateway.stream import StreamHub


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    hub: StreamHub
    dispatcher: Dispatcher
    catalog: Catalog
    batches: BatchRunner
    placer: Placer  # models across the cluster (issue 3)
    feed: StatusFeed
    promoter: Promoter | None = None  # aging, if `low_max_wait` is set
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings, metrics: GatewayMetrics | None = None) -> GatewayState:
        url = settings.require_redis_url()
        # A blocking pool: under a burst, requests wait for one of a bounded set of
        # connections instead of failing ("Too many connections" at 100 by default).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=settings.redis_max_connections, timeout=30,
            health_check_interval=30, decode_responses=True,
        )  # fmt: skip
        client = aioredis.Redis(connection_pool=pool)
        await client.ping()
        hub = StreamHub(client, f"gw-{uuid.uuid4().hex[:8]}", url)
        await hub.start()
        dispatcher = Dispatcher(settings, url, client)
        catalog = Catalog(settings, client)
        files = RedisFileStore(client)
        store = BatchStore(client, files)
        await owner_index.backfill_once(client, [files, store])
        placer = Placer(settings, client, catalog)
        batches = BatchRunner(client, store, dispatcher, catalog, hub.gateway_id, placer.ensure)
        supervisor = BatchSupervisor(client, batches, dispatcher, catalog, hub.gateway_id)
        state = cls(settings, client, hub, dispatcher, catalog, batches, placer, StatusFeed(client))
        await state.catalog.publish_config()
        await placer.start()
        state._background.append(asyncio.create_task(supervisor.run(), name="corral-batches"))
        if settings.low_max_wait is not None:
            state.promoter = Promoter(client, catalog, hub.gateway_id, settings.low_max_wait,
                                      metrics.promotions if metrics else None)  # fmt: skip
            state._background.append(asyncio.create_task(state.promoter.run(), name="corral-aging"))
        return state

    async def stop(self) -> None:
        for task in self._background:
            await cancel_and_wait(task)
        if self.promoter is not None:
            await self.promoter.stop()
        await self.batches.stop()
        await self.placer.stop()
        await self.feed.stop()
        await self.hub.stop()
        self.dispatcher.close()
        await self.redis.aclose()
