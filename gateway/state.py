"""The gateway process's long-lived parts, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from common.errors import NoCapacity
from common.redis_conn import RedisTarget
from common.settings import Settings
from gateway.aio import cancel_and_wait
from gateway.batches import owner_index
from gateway.batches.files import RedisFileStore
from gateway.batches.intake import BatchRunner
from gateway.batches.store import BatchStore
from gateway.batches.supervisor import BatchSupervisor
from gateway.cache import ResponseCache
from gateway.catalog import Catalog
from gateway.leader import LeaderDuty
from gateway.monitoring.board import Board
from gateway.monitoring.liveness import Liveness
from gateway.monitoring.metrics import GatewayMetrics
from gateway.monitoring.model_events import StatusFeed
from gateway.monitoring.overview import overview
from gateway.placement.placer import Placer
from gateway.queueing.affinity_sweep import AffinitySweeper
from gateway.queueing.aging import Promoter
from gateway.queueing.dispatch import Dispatcher
from gateway.streaming.hub import StreamHub
from gateway.tenancy.principals import KeysEpoch

log = logging.getLogger(__name__)


def redis_client(settings: Settings) -> aioredis.Redis:
    """The gateway's Redis client. A blocking pool: under a burst, requests wait for one of
    a bounded set of connections instead of failing ("Too many connections" at 100 by
    default). Nothing connects until the first command; through Sentinel, each connection
    finds the current master when it connects."""
    return RedisTarget.of(settings).async_client(
        max_connections=settings.redis_max_connections,
        timeout=30,
        health_check_interval=30,
        decode_responses=True,
    )


GATEWAY_STOPPING = NoCapacity(
    "This gateway is shutting down; retry the request (another gateway will take it).",
    code="gateway_shutting_down",
    retry_after=1,
)


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    metrics: GatewayMetrics
    hub: StreamHub
    dispatcher: Dispatcher
    catalog: Catalog
    batches: BatchRunner
    placer: Placer
    feed: StatusFeed
    liveness: Liveness  # what /health says about Redis and the workers
    duties: list[LeaderDuty] = field(default_factory=list)  # cluster-wide, one leader each
    draining: bool = False  # shutting down: no new request, /health says so
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    board: Board = field(init=False)  # the status page's feed, read only while watched
    cache: ResponseCache = field(init=False)  # the response cache (models with `cache` on)

    def __post_init__(self) -> None:
        self.board = Board(self.feed, functools.partial(overview, self))
        self.cache = ResponseCache(self.redis, self.metrics)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        client: aioredis.Redis,
        metrics: GatewayMetrics,
        epoch: KeysEpoch,
    ) -> GatewayState:
        url = settings.require_redis_url()
        await client.ping()
        target = RedisTarget.of(settings, url)
        hub = StreamHub(client, f"gw-{uuid.uuid4().hex[:8]}", target, on_keys_changed=epoch.bump)
        await hub.start()
        dispatcher = Dispatcher(settings, url, client, metrics.affinity)
        catalog = Catalog(settings, client)
        files = RedisFileStore(client)
        store = BatchStore(client, files)
        await owner_index.backfill_once(client, [files, store])
        placer = Placer(settings, client, catalog)
        batches = BatchRunner(client, store, dispatcher, catalog, hub.gateway_id, placer.ensure)
        feed = StatusFeed(client)
        liveness = Liveness.of(target)
        await liveness.refresh()
        liveness.start()
        state = cls(
            settings, client, metrics, hub, dispatcher, catalog, batches, placer, feed, liveness
        )
        await catalog.announce()
        view = await placer.view(0)
        await catalog.prune({w.model for w in view.workers if w.model})
        await placer.start()
        state.duties.append(BatchSupervisor(client, batches, dispatcher, catalog, hub.gateway_id))
        state.duties.append(AffinitySweeper(client, hub.gateway_id))
        if settings.low_max_wait is not None:  # aging of low requests
            promoter = Promoter(
                client, catalog, hub.gateway_id, settings.low_max_wait, metrics.promotions
            )
            state.duties.append(promoter)
        for duty in state.duties:
            name = f"corral-{duty.name.replace(' ', '-')}"
            state._background.append(asyncio.create_task(duty.run(), name=name))
        return state

    async def drain(self, grace: float) -> None:
        """Let the open requests finish for up to `grace` seconds, then end those left with
        a clear error (a 503 the client may retry, on another gateway): never a plain-text
        500 from a cancelled handler. New requests are refused meanwhile."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace
        while self.hub.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.hub.active:
            log.info("drain: %d request(s) still open after %.0f s: ended", self.hub.active, grace)
            self.hub.fail_all(GATEWAY_STOPPING)

    async def stop(self) -> None:
        await self.liveness.stop()
        for task in self._background:
            await cancel_and_wait(task)
        for duty in self.duties:
            await duty.stop()
        await self.dispatcher.spills.stop()
        await self.batches.stop()
        await self.placer.stop()
        await self.board.stop()
        await self.cache.stop()
        await self.feed.stop()
        await self.hub.stop()
        self.dispatcher.close()
        await self.redis.aclose()
