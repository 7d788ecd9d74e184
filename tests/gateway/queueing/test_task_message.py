"""The gateway's hand-built task messages against Celery's own, on a real Valkey.

`gateway.queueing.task_message` re-does kombu's Redis envelope so the enqueue is one script;
these tests
publish the same job with the real `send_task` and compare what lands in Redis (entry,
list key, binding) and on the event bus (`task-sent`, which Flower reads). That a worker
runs such a task is shown end to end by `test_openai_e2e.py`, whose requests go this way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import ConnectionError as RedisConnectionError

from common import redis_keys
from common.celery_config import celery_config
from common.errors import QueueFull
from common.jobs import Job, JobKind
from common.priority import Priority
from common.settings import Settings
from common.tracking import RequestRecord, RequestState
from corral.redis_server import EmbeddedRedis
from gateway.queueing.dispatch import EVENT_RECHECK_S, Dispatcher, Listeners
from gateway.queueing.task_message import TaskMessages, args_repr

T = TypeVar("T")
PER_TASK = {"id", "root_id", "argsrepr"}  # headers that name the task itself


@pytest.fixture
def model() -> str:
    """A model no worker holds, so what these tests enqueue stays in its queues."""
    return f"taskmsg-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def db(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def make_job(model: str, priority: Priority = Priority.NORMAL) -> Job:
    return Job(
        kind=JobKind.CHAT,
        model=model,
        body={"messages": [{"role": "user", "content": "hi"}]},
        priority=priority,
        channel=redis_keys.channel("gw-test", "r"),
        deadline=time.time() + 60,
    )


def celery_app(url: str) -> Celery:
    app = Celery("taskmsg-test", set_as_current=False)
    app.conf.update(celery_config(Settings(), redis_url=url))
    return app


def send_task(app: Celery, job: Job, queue: str) -> None:
    """What the gateway did before `gateway.queueing.task_message`."""
    app.send_task(
        redis_keys.INFER_TASK,
        args=[job.model_dump(mode="json")],
        task_id=job.request_id,
        queue=queue,
        expires=datetime.fromtimestamp(job.deadline, UTC),
    )


def with_dispatcher(url: str, work: Callable[[Dispatcher], Awaitable[T]], **settings: Any) -> T:
    async def main() -> T:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        dispatcher = Dispatcher(Settings(**settings), url, client)
        try:
            return await work(dispatcher)
        finally:
            dispatcher.close()
            await client.aclose()

    return asyncio.run(main())


def decoded(raw: bytes | str) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(raw)
    entry["body"] = json.loads(base64.b64decode(entry["body"]))
    return entry


def test_entry_is_what_send_task_writes(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    queue = redis_keys.queue_name(model, Priority.HIGH)
    theirs = make_job(model, Priority.HIGH)
    ours = theirs.model_copy(update={"request_id": "req_ours"})
    app = celery_app(redis_server.url)
    try:
        send_task(app, theirs, queue)
    finally:
        app.close()
    (raw_theirs,) = db.lrange(queue, 0, -1)
    binding = {k: db.smembers(k) for k in db.keys(f"_kombu.binding*.{queue}")}
    db.delete(queue, *binding)

    with_dispatcher(redis_server.url, lambda d: d.submit(ours))

    (raw_ours,) = db.lrange(queue, 0, -1)  # the priority-0 list is named after the queue
    assert not db.keys(f"{queue}\x06\x16*")  # no other priority list
    assert {k: db.smembers(k) for k in db.keys(f"_kombu.binding*.{queue}")} == binding
    a, b = decoded(raw_theirs), decoded(raw_ours)
    assert a.keys() == b.keys()
    assert a["content-type"] == b["content-type"] and a["content-encoding"] == b["content-encoding"]
    assert a["headers"].keys() == b["headers"].keys()
    for name in a["headers"].keys() - PER_TASK:
        assert a["headers"][name] == b["headers"][name], name
    assert (b["headers"]["id"], b["headers"]["root_id"]) == ("req_ours", "req_ours")
    assert b["headers"]["argsrepr"] == args_repr(ours)  # not the prompt: what the request is
    assert "req_ours" in args_repr(ours) and ours.model in args_repr(ours)
    pa, pb = a["properties"], b["properties"]
    assert pa.keys() == pb.keys()
    assert pa["delivery_info"] == pb["delivery_info"] == {"exchange": "", "routing_key": queue}
    for name in ("delivery_mode", "priority", "body_encoding"):
        assert pa[name] == pb[name], name
    assert uuid.UUID(pb["reply_to"])  # the app's oid: each Celery app has its own
    assert pb["correlation_id"] == "req_ours"
    assert abs(int(pa["expiration"]) - int(pb["expiration"])) < 5000
    assert pa["delivery_tag"] != pb["delivery_tag"]
    assert Job.model_validate(b["body"][0][0]) == ours
    assert b["body"][1:] == a["body"][1:]


def test_full_queue_refuses_without_a_record_and_resubmits_pass(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    """The cap is per priority: two normal requests fill normal's room, not high's."""
    first, second = make_job(model), make_job(model)
    extra, again, high = make_job(model), make_job(model), make_job(model, Priority.HIGH)

    async def work(d: Dispatcher) -> None:
        await d.submit(first)
        await d.submit(second)
        with pytest.raises(QueueFull, match=r"normal queue .* \(2 waiting, limit 2\)"):
            await d.submit(extra)
        await d.submit(again, resubmit=True)
        await d.submit(high)

    with_dispatcher(redis_server.url, work, max_queue_size_per_model=2)
    assert not db.exists(redis_keys.request_key(extra.request_id))
    assert [db.llen(q) for q in redis_keys.model_queues(model)] == [1, 3, 0]
    record = RequestRecord.from_hash(db.hgetall(redis_keys.request_key(high.request_id)))
    assert record.state is RequestState.QUEUED and record.priority is Priority.HIGH
    assert record.channel == high.channel and record.deadline == pytest.approx(high.deadline)
    ttl = db.ttl(redis_keys.request_key(high.request_id))
    assert 3600 < ttl <= 3660


def test_batch_items_keep_their_order_per_model(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    other = f"{model}-b"
    jobs = [make_job(model), make_job(other), make_job(model), make_job(model)]
    with_dispatcher(redis_server.url, lambda d: d.send_batch_items(jobs))
    for alias in (model, other):
        queue = redis_keys.batch_queue(alias)
        oldest_first = [decoded(raw)["headers"]["id"] for raw in reversed(db.lrange(queue, 0, -1))]
        assert oldest_first == [j.request_id for j in jobs if j.model == alias]
        assert db.sismember(f"_kombu.binding.{queue}", f"{queue}\x06\x16\x06\x16{queue}")


def capture_sent(url: str, ids: set[str], send: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """The `task-sent` events for `ids` that a Celery event receiver (what Flower runs)
    gets while and after `send` runs."""
    app, got, ready = celery_app(url), {}, threading.Event()

    def on_sent(event: dict[str, Any]) -> None:
        if event["uuid"] in ids:
            got[event["uuid"]] = event
        recv.should_stop = ids <= got.keys()

    def listen() -> None:
        with contextlib.suppress(TimeoutError):
            recv.capture(timeout=20, wakeup=False)

    probe = redis.Redis.from_url(url)
    patterns = int(probe.execute_command("PUBSUB", "NUMPAT"))
    try:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"task-sent": on_sent})
            recv.on_consume_ready = lambda *_, **__: ready.set()
            thread = threading.Thread(target=listen, daemon=True)
            thread.start()
            assert ready.wait(10), "the event receiver never started"
            # "Ready" comes before kombu has sent its PSUBSCRIBE: an event sent in between
            # is lost. Wait until Redis counts the receiver's pattern.
            deadline = time.monotonic() + 10
            while int(probe.execute_command("PUBSUB", "NUMPAT")) <= patterns:
                assert time.monotonic() < deadline, "the event receiver never subscribed"
                time.sleep(0.01)
            send()
            thread.join(25)
    finally:
        app.close()
        probe.close()
    return got


def test_task_sent_event_is_what_send_task_sends(redis_server: EmbeddedRedis, model: str) -> None:
    queue = redis_keys.queue_name(model, Priority.LOW)
    theirs, ours = make_job(model, Priority.LOW), make_job(model, Priority.LOW)

    def send() -> None:
        app = celery_app(redis_server.url)
        try:
            send_task(app, theirs, queue)
        finally:
            app.close()
        with_dispatcher(redis_server.url, lambda d: d.submit(ours))

    events = capture_sent(redis_server.url, {theirs.request_id, ours.request_id}, send)
    a, b = events[theirs.request_id], events[ours.request_id]
    assert a.keys() == b.keys()
    assert {
        "name",
        "args",
        "kwargs",
        "retries",
        "eta",
        "expires",
        "queue",
        "exchange",
        "routing_key",
        "root_id",
        "parent_id",
    } <= b.keys()
    for name in (
        "name",
        "kwargs",
        "retries",
        "eta",
        "queue",
        "exchange",
        "routing_key",
        "parent_id",
        "hostname",
    ):
        assert a[name] == b[name], name
    assert b["root_id"] == ours.request_id and b["queue"] == queue
    assert b["expires"] == datetime.fromtimestamp(ours.deadline, UTC).isoformat()


@pytest.mark.parametrize(
    ("url", "channel"),
    [
        ("redis://127.0.0.1:6379", "/0.celeryev/task.sent"),
        ("redis://127.0.0.1:6379/3", "/3.celeryev/task.sent"),
    ],
)
def test_task_sent_channel_follows_the_broker_db(url: str, channel: str) -> None:
    """kombu prefixes its fanout channels with the broker's db number."""
    app = celery_app(url)
    try:
        messages = TaskMessages(app)
        event = messages.sent_event(messages.build(make_job("m"), "p2-normal.m"))
    finally:
        app.close()
    assert event is not None and event.channel == channel


def test_a_lost_task_sent_event_does_not_fail_the_request(
    db: redis.Redis, redis_server: EmbeddedRedis, model: str
) -> None:
    """The event goes out after the task is queued; if its PUBLISH fails, the request
    (already queued, soon running) must not be answered with an error."""
    job = make_job(model)

    async def work(d: Dispatcher) -> None:
        async def broken(*_: Any, **__: Any) -> int:
            raise RedisConnectionError("gone")

        d._redis.publish = broken  # type: ignore[method-assign]
        await d.submit(job)

    with_dispatcher(redis_server.url, work)
    queued = db.lrange(redis_keys.queue_name(model, Priority.NORMAL), 0, -1)
    assert [decoded(e)["headers"]["id"] for e in queued] == [job.request_id]


def test_listeners_stop_the_events_nobody_hears_and_look_again() -> None:
    now = [100.0]
    listeners = Listeners(clock=lambda: now[0])
    assert listeners.wanted()  # the first event always goes
    listeners.heard(0)
    assert not listeners.wanted()
    now[0] += EVENT_RECHECK_S - 0.01
    assert not listeners.wanted()
    now[0] += 0.02
    assert listeners.wanted()  # one goes out to look for a listener
    listeners.heard(1)
    now[0] += 0.001
    assert listeners.wanted()  # heard: every event goes
    listeners.heard(2)
    assert listeners.wanted()


def test_task_sent_events_nobody_hears_are_not_published(
    redis_server: EmbeddedRedis, model: str
) -> None:
    """No subscriber (no Flower): after the first event, none for `EVENT_RECHECK_S`."""
    jobs = [make_job(model) for _ in range(3)]
    published: list[str] = []

    async def work(d: Dispatcher) -> None:
        real = d._redis.publish

        async def counting(channel: str, payload: str) -> int:
            published.append(channel)
            return int(await real(channel, payload))

        d._redis.publish = counting  # type: ignore[method-assign,assignment]
        for job in jobs:
            await d.submit(job)

    with_dispatcher(redis_server.url, work)
    assert [c.endswith("task.sent") for c in published] == [True]
