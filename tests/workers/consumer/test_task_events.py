"""Task events only while a Flower asks (`workers.consumer.task_events`): units on the
lease and the dispatcher's event groups, then a real worker on the shared cluster, whose
events are read straight off Valkey's pub/sub."""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.worker.control import Panel

from common.celery_config import celery_config
from common.settings import Settings
from tests.conftest import CHAT, Cluster
from tests.support import wait_for
from workers.consumer import task_events
from workers.consumer.task_events import LEASE_S, TASK, Lease, sync


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def consumer(groups: set[str]) -> Any:
    return SimpleNamespace(event_dispatcher=SimpleNamespace(groups=groups))


def test_events_follow_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(task_events, "lease", Lease(clock))
    c = consumer({"worker"})
    sync(c)
    assert c.event_dispatcher.groups == {"worker"}  # nobody asked: heartbeats only
    Panel.data["enable_events"](SimpleNamespace(consumer=c))  # what Flower's broadcast runs
    assert c.event_dispatcher.groups == {"worker", TASK}
    clock.now += LEASE_S - 1
    sync(c)
    assert TASK in c.event_dispatcher.groups  # still within the lease
    clock.now += 2
    sync(c)
    assert c.event_dispatcher.groups == {"worker"}  # Flower went away: off again


def test_a_reconnected_dispatcher_gets_them_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_events, "lease", Lease(Clock()))
    task_events.lease.renew()
    c = consumer({"worker"})  # a new dispatcher after a broker reconnect
    sync(c)
    assert TASK in c.event_dispatcher.groups
    sync(SimpleNamespace(event_dispatcher=None))  # before the first connection: nothing


def test_the_worker_panel_has_this_enable_events() -> None:
    assert Panel.data["enable_events"] is task_events.enable_events


def _task_events(sub: redis.client.PubSub, seconds: float) -> list[str]:
    """Event types seen on Celery's event channels for `seconds` (kombu's envelope, its
    body base64-encoded JSON: one event, or a list of buffered ones)."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.1)
        if msg and msg["type"] == "pmessage":
            envelope = json.loads(msg["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            events = json.loads(body)
            seen += [e["type"] for e in (events if isinstance(events, list) else [events])]
    return seen


def test_a_worker_sends_task_events_only_when_asked(cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    sub = r.pubsub()
    sub.psubscribe("/*.celeryev/*")
    try:
        with cluster.client() as client:
            client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        seen = _task_events(sub, 4.5)  # heartbeats every 2 s
        assert "worker-heartbeat" in seen  # the worker's own events go out (Flower lists it)
        # the gateway's `task-sent` (it sends while anyone listens: this test does), but
        # none of the worker's task events: nobody asked for them
        assert not [t for t in seen if t.startswith("task-") and t != "task-sent"], seen
        app = Celery("test-flower-stand-in", set_as_current=False)
        app.conf.update(celery_config(Settings(), redis_url=cluster.redis_url))
        app.control.enable_events()  # as Flower does every 5 s
        app.close()
        time.sleep(0.5)
        with cluster.client() as client:
            client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert wait_for(lambda: "task-succeeded" in _task_events(sub, 0.5), 10)
    finally:
        sub.close()
        r.close()
