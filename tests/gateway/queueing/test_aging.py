"""Aging (`low_max_wait`, `gateway.queueing.aging`): the promote script and the promoter on a bare
Valkey with real kombu messages (sent by Celery), then a real cluster whose one slot is
held by a long generation while low and normal requests queue behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from common import redis_keys
from common.net import free_port
from common.priority import Priority
from common.settings import ModelConfig, Settings
from corral.redis_server import EmbeddedRedis
from gateway.catalog import Catalog
from gateway.leader import LeaderLock
from gateway.queueing.aging import PROMOTE_LUA, Promoter
from gateway.queueing.records import Tracker, enqueued_at
from tests.conftest import Cluster, start_cluster
from tests.gateway.queueing.conftest import enqueue
from tests.support import Blocker, corral_child, slow_model, wait_for, wait_healthy

LOW, NORMAL = redis_keys.queue_name("m", Priority.LOW), redis_keys.queue_name("m", Priority.NORMAL)


def ids(r: redis.Redis, queue: str) -> list[str]:
    """Request ids in the order workers will take them (right end first)."""
    return [json.loads(m)["headers"]["id"] for m in reversed(r.lrange(queue, 0, -1))]


def promote(url: str, max_wait: float) -> int:
    async def main() -> int:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            catalog = Catalog(Settings(redis_url=url), client)
            return await Promoter(client, catalog, "gw-test", max_wait).promote("m")
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_aged_lows_move_to_normal_by_age(
    own_redis: EmbeddedRedis, r: redis.Redis, celery_app: Celery
) -> None:
    n_old = enqueue(celery_app, r, Priority.NORMAL, waited=40)
    n_young = enqueue(celery_app, r, Priority.NORMAL, waited=5)
    l_30, l_20, l_new = (enqueue(celery_app, r, Priority.LOW, w) for w in (30, 20, 0.1))
    last = r.lindex(LOW, -1)  # l_30's
    assert isinstance(last, str)  # `r` decodes replies
    since = enqueued_at(last)

    assert promote(own_redis.url, max_wait=10) == 2
    assert ids(r, LOW) == [l_new]  # not old enough: stays
    # as if enqueued as normal requests: after the older normal one, before the younger
    assert ids(r, NORMAL) == [n_old, l_30, l_20, n_young]
    for request_id in (l_30, l_20):
        record = r.hgetall(redis_keys.request_key(request_id))
        assert record["priority"] == "normal" and float(record["promoted_at"]) > time.time() - 5
    assert r.hget(redis_keys.request_key(l_new), "priority") == "low"
    assert "promoted_at" not in r.hgetall(redis_keys.request_key(l_new))

    moved = json.loads(r.lrange(NORMAL, 0, -1)[-2])  # l_30, next after n_old
    assert moved["properties"]["delivery_info"]["routing_key"] == NORMAL  # redelivered there
    assert moved["headers"]["id"] == l_30
    assert enqueued_at(json.dumps(moved)) == since  # its wait is not reset

    async def position() -> int | None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        record = await Tracker(client).get(l_30)
        await client.aclose()
        assert record is not None and record.priority is Priority.NORMAL
        return record.position

    assert asyncio.run(position()) == 2


def test_promoted_later_never_passes_promoted_earlier(
    own_redis: EmbeddedRedis, r: redis.Redis, celery_app: Celery
) -> None:
    """Always pushing at the right end would let each later promotion jump the earlier
    ones while the slot stays busy; placed by age they keep their order."""
    first, second = (enqueue(celery_app, r, Priority.LOW, w) for w in (30, 20))
    assert promote(own_redis.url, max_wait=25) == 1
    assert promote(own_redis.url, max_wait=15) == 1
    assert ids(r, NORMAL) == [first, second] and r.llen(LOW) == 0


def test_script_moves_a_message_only_while_it_is_last(
    own_redis: EmbeddedRedis, r: redis.Redis, celery_app: Celery
) -> None:
    oldest, other = (enqueue(celery_app, r, Priority.LOW, w) for w in (30, 20))
    script = r.register_script(PROMOTE_LUA)
    last, not_last = r.lindex(LOW, -1), r.lindex(LOW, 0)
    assert last is not None and not_last is not None
    record = redis_keys.request_key(other)
    live = [redis_keys.live_key(LOW), redis_keys.live_key(NORMAL)]
    r.zadd(live[0], {oldest: 9e9})
    # a message that is not (or no longer) the last one: nothing moves
    args = [not_last, "moved", "", "normal", 1, other]
    assert script(keys=[LOW, NORMAL, record, *live], args=args) == 0
    assert ids(r, LOW) == [oldest, other] and r.llen(NORMAL) == 0
    assert r.hget(record, "priority") == "low"
    # the last one moves; a neighbour that is gone means the right end; no record, none made
    gone = redis_keys.request_key("req_gone")
    args = [last, "moved", "nope", "normal", 1, oldest]
    assert script(keys=[LOW, NORMAL, gone, *live], args=args) == 2
    assert r.lrange(NORMAL, 0, -1) == ["moved"] and not r.exists(gone)
    assert ids(r, LOW) == [other]
    # it waits at normal now, by the same deadline
    assert r.zscore(live[1], oldest) == 9e9 and not r.zscore(live[0], oldest)


def test_one_leader_at_a_time(own_redis: EmbeddedRedis, r: redis.Redis, celery_app: Celery) -> None:
    stale = enqueue(celery_app, r, Priority.LOW, 30)
    conf = Settings(redis_url=own_redis.url, models={"m": ModelConfig(model_path=Path("m.gguf"))})

    async def main() -> None:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        a = LeaderLock(client, redis_keys.AGING_LEADER, "gw-a", ttl=5)
        b = LeaderLock(client, redis_keys.AGING_LEADER, "gw-b", ttl=5)
        assert await a.hold() and await a.hold() and not await b.hold()
        await a.release()
        assert await b.hold() and not await a.hold()
        promoter = Promoter(client, Catalog(conf, client), "gw-b", 10)
        assert await promoter.tick() == 1  # every catalog model's low queue
        await client.aclose()

    asyncio.run(main())
    assert ids(r, NORMAL) == [stale]


def test_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().low_max_wait is None  # off by default
    monkeypatch.setenv("CORRAL_LOW_MAX_WAIT", "2.5")
    assert Settings().low_max_wait == 2.5
    monkeypatch.setenv("CORRAL_LOW_MAX_WAIT", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()


MODEL = "age-chat"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def acluster(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One worker with one slot; its gateway does not age (an aging one is added per test)."""
    root = tmp_path_factory.mktemp("aging")
    model = slow_model(root / f"{MODEL}.gguf")  # a Blocker lasts
    worker = ["--model", str(model), "--slots", "1", "--ctx-size", "16384"]
    running = start_cluster(redis_server.url, root / "logs", [worker])
    yield running
    running.stop()


def send(pool: ThreadPoolExecutor, base: str, priority: str) -> Future[httpx.Response]:
    body = {"model": MODEL, "messages": HI, "max_tokens": 1}
    return pool.submit(
        httpx.post,
        f"{base}/v1/chat/completions",
        json=body,
        headers={"X-Request-Priority": priority},
        timeout=60,
    )


def depth(base: str, priority: str) -> int:
    stats = httpx.get(f"{base}/v1/queue/stats").json()
    return int(stats["models"][MODEL]["priorities"][priority]["depth"])


def record(base: str, request_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/v1/requests/{request_id}").json())


def run_order(base: str, futures: list[Future[httpx.Response]]) -> list[str]:
    """The replies' request ids, in the order their tasks started."""
    started = []
    for future in futures:
        reply = future.result(60)
        assert reply.status_code == 200, reply.text
        rid = reply.headers["x-request-id"]
        started.append((record(base, rid)["started_at"], rid))
    return [rid for _, rid in sorted(started)]


def test_an_aged_low_request_runs_before_later_normal_ones(
    acluster: Cluster, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    port = free_port()
    aging = corral_child(
        "gateway-aging",
        ["gateway", "--port", str(port)],
        tmp_path / "gw.log",
        CORRAL_REDIS_URL=redis_server.url,
        CORRAL_LOW_MAX_WAIT="1",
    )
    aging.start()
    base = acluster.base_url
    try:
        agw = f"http://127.0.0.1:{port}"
        wait_healthy(agw, 0)
        with ThreadPoolExecutor(8) as pool, Blocker(base, MODEL):
            lows = [send(pool, base, "low")]
            time.sleep(0.6)  # so they are promoted in different rounds
            lows.append(send(pool, base, "low"))
            assert wait_for(lambda: depth(base, "normal") == 2, 10, 0.05), "never promoted"
            assert depth(base, "low") == 0
            with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
                promoted = ids(client, f"p2-normal.{MODEL}")  # in the order they run
            for position, rid in enumerate(promoted, 1):
                rec = record(base, rid)
                assert rec["priority"] == "normal" and rec["promoted_at"] is not None
                assert rec["state"] == "queued" and rec["position"] == position
            normals = [send(pool, base, "normal") for _ in range(2)]
            assert wait_for(lambda: depth(base, "normal") == 4, 10, 0.05)
        order = run_order(base, lows + normals)
        low_ids = [f.result().headers["x-request-id"] for f in lows]
        assert order[:2] == low_ids == promoted  # before later normals, in their own order
        assert all(record(base, rid)["priority"] == "normal" for rid in low_ids)  # once run too
        metrics = httpx.get(f"{agw}/metrics").text
        assert f'corral_promotions_total{{model="{MODEL}"}} 2.0' in metrics
        assert "promoted low->normal" in (tmp_path / "gw.log").read_text()
    finally:
        aging.stop()


def test_without_the_setting_nothing_is_promoted(acluster: Cluster) -> None:
    base = acluster.base_url
    with ThreadPoolExecutor(8) as pool, Blocker(base, MODEL):
        lows = [send(pool, base, "low") for _ in range(2)]
        assert wait_for(lambda: depth(base, "low") == 2, 10, 0.05)
        time.sleep(1.5)
        normal = send(pool, base, "normal")
        assert wait_for(lambda: depth(base, "normal") == 1, 10, 0.05)
        assert depth(base, "low") == 2
    order = run_order(base, [normal, *lows])
    assert order[0] == normal.result().headers["x-request-id"]
    for future in lows:
        rec = record(base, future.result().headers["x-request-id"])
        assert rec["priority"] == "low" and rec["promoted_at"] is None
