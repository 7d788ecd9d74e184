"""Queue ETAs (`gateway.queueing.eta`): the estimate itself, then positions and estimated
starts of several queued requests found at once on a bare Valkey holding real Celery
messages, with the model's slots and service times as workers would leave them."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis
from celery import Celery

from common import redis_keys, telemetry
from common.priority import Priority
from common.registry import WorkerInfo, WorkerState
from common.telemetry import Outcome
from common.tracking import RequestRecord, RequestState, running_member
from corral.redis_server import EmbeddedRedis
from gateway.queueing.eta import Slots, estimate_start
from gateway.queueing.records import Tracker
from tests.gateway.queueing.conftest import enqueue

NOW = 1_000_000.0


def test_a_free_slot_starts_the_next_request_now() -> None:
    slots = Slots(total=2, busy_since=[NOW - 1], service_s=4.0)
    assert estimate_start(1, slots, NOW) == NOW
    assert estimate_start(2, slots, NOW) == NOW + 3  # the busy slot, a service after it began
    assert estimate_start(3, slots, NOW) == NOW + 4  # the free slot's second turn


def test_slots_take_turns_one_service_time_each() -> None:
    slots = Slots(total=2, busy_since=[NOW - 3, NOW - 1], service_s=4.0)
    starts = [estimate_start(p, slots, NOW) for p in range(1, 6)]
    assert starts == [NOW + 1, NOW + 3, NOW + 5, NOW + 7, NOW + 9]


def test_a_request_running_past_the_mean_frees_its_slot_any_moment() -> None:
    assert estimate_start(1, Slots(1, [NOW - 60], service_s=2.0), NOW) == NOW


def test_no_estimate_without_slots_or_history() -> None:
    assert estimate_start(1, Slots(0, [], service_s=2.0), NOW) is None
    assert estimate_start(1, Slots(1, [NOW], service_s=None), NOW) is None


def _worker(slots: int) -> WorkerInfo:
    return WorkerInfo(id="w1", host="h", pid=1, model="m", slots=slots, state=WorkerState.READY)


def test_place_finds_every_queued_request_and_its_start(
    own_redis: EmbeddedRedis, r: redis.Redis, celery_app: Celery
) -> None:
    low = enqueue(celery_app, r, Priority.LOW, 30)
    normal_1 = enqueue(celery_app, r, Priority.NORMAL, 20)
    normal_2 = enqueue(celery_app, r, Priority.NORMAL, 10)
    high = enqueue(celery_app, r, Priority.HIGH, 1)
    now = time.time()
    r.zadd(redis_keys.running_key("m"), {running_member("w1", "req_busy"): now - 1})
    keys, args = telemetry.record_args("m", Outcome(RequestState.DONE, service_ms=4000), now)
    r.eval(telemetry.RECORD_LUA, len(keys), *keys, *args)  # one request served in 4 s

    async def place() -> list[RequestRecord]:
        client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        try:
            tracker = Tracker(client)
            records = [await tracker.get(i) for i in (low, normal_1, normal_2, high)]
            found = [rec for rec in records if rec is not None]
            for rec in found:
                rec.position = rec.estimated_start_at = None
            await tracker.place(found, [_worker(slots=1)])
            return found
        finally:
            await client.aclose()

    placed = asyncio.run(place())
    assert [rec.position for rec in placed] == [4, 2, 3, 1]  # high first, then by age
    starts = [rec.estimated_start_at for rec in placed]
    assert all(s is not None for s in starts)
    # one slot, busy for 1 s of a 4 s service: the next starts in ~3 s, then every 4 s
    for rec, turn in zip(placed, [3, 1, 2, 0], strict=True):
        assert rec.estimated_start_at is not None
        assert abs(rec.estimated_start_at - (now + 3 + 4 * turn)) < 1.0, rec
