"""Fixtures for the queueing tests: Celery on the module's own Valkey, and requests
enqueued on it as the gateway does (a record, then the task message Celery writes)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from common import redis_keys
from common.celery_config import celery_config
from common.jobs import Job, JobKind
from common.priority import Priority
from common.settings import Settings
from corral.redis_server import EmbeddedRedis
from gateway.queueing.records import new_record


@pytest.fixture(scope="module")
def celery_app(own_redis: EmbeddedRedis) -> Iterator[Celery]:
    app = Celery("test-queueing", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=own_redis.url)))
    yield app
    app.close()


def enqueue(app: Celery, r: redis.Redis, priority: Priority, waited: float) -> str:
    """A request of model `m` enqueued `waited` seconds ago, as the gateway does it."""
    job = Job(
        kind=JobKind.CHAT,
        model="m",
        body={},
        priority=priority,
        channel="c",
        deadline=time.time() + 600,
        enqueued_at=time.time() - waited,
    )
    r.hset(redis_keys.request_key(job.request_id), mapping=new_record(job).to_hash())
    app.send_task(
        redis_keys.INFER_TASK,
        args=[job.model_dump(mode="json")],
        task_id=job.request_id,
        queue=redis_keys.queue_name("m", priority),
    )
    return job.request_id
