"""Units on a real Valkey: where a batch item's result goes (`workers.task.batch_sink`). Each
`custom_id` is written and counted once; nothing is recorded once the supervisor has begun
to finalize the batch, so its counts always match the lines of its output files (an item
still running at a cancel's grace period or at expiry used to be counted, yet in no file)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from common import redis_keys
from common.batch import BatchState
from common.jobs import Job, JobKind
from common.priority import Priority
from corral.redis_server import EmbeddedRedis
from workers.task import batch_sink


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def _item(batch_id: str, custom_id: str) -> Job:
    return Job(
        kind=JobKind.CHAT,
        model="m",
        body={},
        stream=False,
        priority=Priority.LOW,
        channel="",
        deadline=time.time() + 60,
        batch_id=batch_id,
        custom_id=custom_id,
        request_id=f"{batch_id}-{custom_id}",
    )


def _batch(r: redis.Redis, status: BatchState) -> str:
    batch_id = f"batch_sink_{time.monotonic_ns()}"
    r.hset(redis_keys.batch_key(batch_id), mapping={"status": status.value, "completed": 0})
    return batch_id


@pytest.mark.parametrize("status", [BatchState.IN_PROGRESS, BatchState.CANCELLING])
def test_a_running_batch_takes_each_result_once(r: redis.Redis, status: BatchState) -> None:
    batch_id = _batch(r, status)
    assert batch_sink.record_success(r, _item(batch_id, "a"), {"choices": []})
    assert not batch_sink.record_success(r, _item(batch_id, "a"), {"choices": []})  # redelivered
    assert r.hget(redis_keys.batch_key(batch_id), "completed") == "1"
    assert batch_sink.has_result(r, _item(batch_id, "a"))


@pytest.mark.parametrize(
    "status",
    [BatchState.FINALIZING, BatchState.COMPLETED, BatchState.CANCELLED, BatchState.EXPIRED],
)
def test_a_batch_being_finalized_takes_no_more_results(r: redis.Redis, status: BatchState) -> None:
    batch_id = _batch(r, status)
    assert not batch_sink.record_success(r, _item(batch_id, "late"), {"choices": []})
    assert r.hget(redis_keys.batch_key(batch_id), "completed") == "0"
    assert not batch_sink.has_result(r, _item(batch_id, "late"))
