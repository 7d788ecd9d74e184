"""Prefix affinity's Redis side, on a real Valkey: the enqueue script's choice of a
replica's queue, the spill after the wait, a replica giving its queues back, the sweep of
a gone replica's queues. (The whole path with two replicas: `test_affinity_e2e.py`.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from common import redis_keys
from common.jobs import Job, JobKind
from common.priority import Priority
from common.registry import WorkerInfo, WorkerState
from common.settings import Settings
from corral.redis_server import EmbeddedRedis
from gateway.queueing.affinity import Preference
from gateway.queueing.affinity_sweep import AffinitySweeper
from gateway.queueing.dispatch import Dispatcher
from gateway.queueing.task_message import task_body
from workers.models import affinity as replica

T = TypeVar("T")
HIGH, NORMAL = Priority.HIGH, Priority.NORMAL


@pytest.fixture
def model() -> str:
    """A model no worker holds: what these tests enqueue stays where it was put."""
    return f"aff-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def db(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def job(model: str, key: str | None = "conv", priority: Priority = NORMAL) -> Job:
    return Job(
        kind=JobKind.CHAT,
        model=model,
        body={"messages": [{"role": "user", "content": "hi"}]},
        priority=priority,
        channel="c",
        deadline=time.time() + 60,
        affinity=key,
    )


def run(url: str, work: Callable[[Dispatcher, Counter], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        counter = Counter("corral_affinity", "", ["model", "result"], registry=CollectorRegistry())
        dispatcher = Dispatcher(Settings(), url, client, counter)
        try:
            return await work(dispatcher, counter)
        finally:
            await dispatcher.spills.stop()
            dispatcher.close()
            await client.aclose()

    return asyncio.run(main())


def routed(db: redis.Redis, model: str, worker: str, priority: Priority = NORMAL) -> list[str]:
    """Request ids in `worker`'s affinity queue of `model`, oldest first."""
    raw = db.lrange(redis_keys.affinity_queue(model, priority, worker), 0, -1)
    return [task_body(json.loads(r))[0][0]["request_id"] for r in reversed(raw)]


def shared(db: redis.Redis, model: str, priority: Priority = NORMAL) -> list[str]:
    raw = db.lrange(redis_keys.queue_name(model, priority), 0, -1)
    return [task_body(json.loads(r))[0][0]["request_id"] for r in reversed(raw)]


def count(counter: Counter, model: str, result: str) -> float:
    return counter.labels(model=model, result=result)._value.get()


def test_a_key_goes_to_the_replica_that_ran_it_and_a_new_one_to_the_shared_queue(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    prefer = Preference(("w2", "w1"), wait=60)
    first, second, third, fourth = job(model), job(model), job(model), job(model)

    async def work(d: Dispatcher, counter: Counter) -> tuple[float, ...]:
        await d.submit(first, affinity=prefer)  # nobody ran "conv" yet
        db.set(redis_keys.affinity_key(model, "conv"), "w1")  # w1 ran it (its claim)
        await d.submit(second, affinity=prefer)
        await d.submit(third, affinity=prefer)
        db.set(redis_keys.affinity_key(model, "conv"), "w9")  # a replica gone since
        await d.submit(fourth, affinity=prefer)
        # positions in the queues the replica takes from
        records = [await d.tracker.get(j.request_id) for j in (first, second, third)]
        positions = tuple(float(r.position or 0) for r in records if r is not None)
        return count(counter, model, "new"), count(counter, model, "hit"), *positions

    assert run(redis_server.url, work) == (2, 2, 1, 1, 2)
    assert routed(db, model, "w1") == [second.request_id, third.request_id]
    assert routed(db, model, "w2") == []
    assert shared(db, model) == [first.request_id, fourth.request_id]
    record = db.hgetall(redis_keys.request_key(second.request_id))
    assert (record["affinity"], record["affinity_worker"]) == ("hit", "w1")
    record = db.hgetall(redis_keys.request_key(fourth.request_id))
    assert record["affinity"] == "new" and "affinity_worker" not in record
    # counted as waiting (depth, caps) like any queued request; routed to the shared queue
    live = redis_keys.live_key(redis_keys.queue_name(model, NORMAL))
    assert db.zcard(live) == 4
    entry = json.loads(str(db.lindex(redis_keys.affinity_queue(model, NORMAL, "w1"), 0)))
    assert entry["properties"]["delivery_info"]["routing_key"] == redis_keys.queue_name(
        model, NORMAL
    )


def test_queue_stats_see_the_oldest_request_in_an_affinity_queue(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    """A request waiting in a replica's own queue counts for its priority's oldest wait
    (it was read from the shared queue only)."""
    replica.register(db, model, "w1")
    db.set(redis_keys.affinity_key(model, "conv"), "w1")

    async def work(d: Dispatcher, counter: Counter) -> Any:
        await d.submit(job(model), affinity=Preference(("w1", "w2"), wait=60))
        await asyncio.sleep(0.3)
        await d.submit(job(model, key=None))  # the shared queue's only, and newer
        return await d.tracker.queue_stats([model])

    try:
        stats = run(redis_server.url, work)
    finally:
        replica.give_back(db, model, "w1")
    normal = stats[model]["priorities"]["normal"]
    assert normal["depth"] == 2
    assert normal["oldest_wait_s"] >= 0.3, normal


def test_no_preference_or_no_key_is_the_shared_queue(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    keyless = job(model, key=None)
    plain = job(model)

    async def work(d: Dispatcher, counter: Counter) -> None:
        await d.submit(keyless, affinity=Preference(("w1", "w2"), wait=60))
        await d.submit(plain)

    run(redis_server.url, work)
    assert shared(db, model) == [keyless.request_id, plain.request_id]
    assert "affinity" not in db.hgetall(redis_keys.request_key(plain.request_id))


def test_a_request_its_replica_does_not_take_in_time_spills_to_the_shared_queue(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    waiting, taken = job(model, "a"), job(model, "b")
    older = job(model, key=None)
    for key in ("a", "b"):
        db.set(redis_keys.affinity_key(model, key), "w1")

    async def work(d: Dispatcher, counter: Counter) -> float:
        await d.submit(older)
        await d.submit(waiting, affinity=Preference(("w1", "w2"), wait=0.2))
        await d.submit(taken, affinity=Preference(("w1", "w2"), wait=0.2))
        assert routed(db, model, "w1") == [waiting.request_id, taken.request_id]
        mine = redis_keys.affinity_queue(model, NORMAL, "w1")
        db.lrem(mine, 1, str(db.lindex(mine, 0)))  # w1 took `taken` (the newest) meanwhile
        await asyncio.sleep(0.6)
        return count(counter, model, "spill")

    assert run(redis_server.url, work) == 1
    assert routed(db, model, "w1") == []
    assert shared(db, model) == [waiting.request_id, older.request_id]  # served next
    assert db.hget(redis_keys.request_key(waiting.request_id), "affinity") == "spill"
    assert db.hget(redis_keys.request_key(taken.request_id), "affinity") == "hit"


def test_a_replica_gives_its_queues_back_oldest_first(db: redis.Redis, model: str) -> None:
    queue = redis_keys.affinity_queue(model, HIGH, "w1")
    db.lpush(redis_keys.queue_name(model, HIGH), "s-old", "s-new")
    db.lpush(queue, "a-old", "a-mid", "a-new")
    replica.register(db, model, "w1")
    assert db.hexists(redis_keys.AFFINITY_QUEUES, queue)
    assert replica.give_back(db, model, "w1") == 3
    assert not db.exists(queue) and not db.hexists(redis_keys.AFFINITY_QUEUES, queue)
    taken = [db.rpop(redis_keys.queue_name(model, HIGH)) for _ in range(5)]
    assert taken == ["a-old", "a-mid", "a-new", "s-old", "s-new"]


def test_the_sweeper_empties_the_queues_of_replicas_gone_or_serving_another_model(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    def live(worker: str, serves: str | None) -> None:
        info = WorkerInfo(id=worker, host="h", pid=1, slots=1, state=WorkerState.READY)
        info.model = serves
        db.set(redis_keys.worker_key(worker), info.model_dump_json(), ex=60)
        db.sadd(redis_keys.WORKERS, worker)

    live("up", model)
    live("swapped", "another-model")
    for worker in ("up", "swapped", "dead"):
        replica.register(db, model, worker)
        db.lpush(redis_keys.affinity_queue(model, NORMAL, worker), f"from-{worker}")
    binding = f"_kombu.binding.{redis_keys.affinity_queue(model, NORMAL, 'dead')}"
    db.sadd(binding, "x")

    async def sweep() -> Any:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            return await AffinitySweeper(client, "test").tick()
        finally:
            await client.aclose()

    assert asyncio.run(sweep()) >= 2
    assert sorted(db.lrange(redis_keys.queue_name(model, NORMAL), 0, -1)) == [
        "from-dead",
        "from-swapped",
    ]
    assert db.lrange(redis_keys.affinity_queue(model, NORMAL, "up"), 0, -1) == ["from-up"]
    assert db.hexists(redis_keys.AFFINITY_QUEUES, redis_keys.affinity_queue(model, NORMAL, "up"))
    gone = redis_keys.affinity_queue(model, NORMAL, "dead")
    assert not db.hexists(redis_keys.AFFINITY_QUEUES, gone) and not db.exists(binding)
    db.delete(redis_keys.worker_key("up"), redis_keys.worker_key("swapped"))
    replica.give_back(db, model, "up")
