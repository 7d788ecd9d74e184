"""Claims on a real Valkey: a redelivered task never streams twice, a non-streaming one runs
at most once more, only when its first worker is dead, and a task cancelled while queued is
never claimed. The first claim writes the running record in the same round trip."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis

from common import redis_keys
from common.jobs import Job, JobKind
from common.tracking import RequestState, running_member
from corral.redis_server import EmbeddedRedis
from workers.task import ledger
from workers.task.ledger import Claim, PendingClaim


def claim(r: redis.Redis, job: Job, worker_id: str, ttl: int) -> Claim:
    """A claim sent and read at once (the task sends it once its call is on the wire)."""
    return PendingClaim(r, job, worker_id, ttl).result()


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _job(stream: bool) -> Job:
    return Job(kind=JobKind.CHAT, model="m", body={}, stream=stream, channel="c", deadline=9e9)


def _record(r: redis.Redis, job: Job) -> dict[str, str]:
    raw = r.hgetall(redis_keys.request_key(job.request_id))
    return {redis_keys.text(k): redis_keys.text(v) for k, v in raw.items()}


def _running(r: redis.Redis, job: Job) -> list[str]:
    members = cast(list[bytes], r.zrange(redis_keys.running_key(job.model), 0, -1))
    return [m.decode() for m in members if m.decode().endswith(job.request_id)]


def test_first_claim_writes_the_running_record_like_started(r: redis.Redis) -> None:
    job, twin = _job(stream=True), _job(stream=True)
    assert claim(r, job, "w1", 60) is Claim.FIRST
    ledger.started(r, twin, "w1")
    record, expected = _record(r, job), _record(r, twin)
    assert record.keys() == expected.keys()
    assert record["state"] == RequestState.RUNNING.value and record["worker"] == "w1"
    assert record["stream"] == "true" and record["priority"] == job.priority.value
    assert float(record["enqueued_at"]) == job.enqueued_at
    assert r.get(redis_keys.claim_key(job.request_id)) == b"w1"
    assert 0 < r.ttl(redis_keys.claim_key(job.request_id)) <= 60
    assert _running(r, job) == [running_member("w1", job.request_id)]
    score = r.zscore(redis_keys.running_key(job.model), running_member("w1", job.request_id))
    assert score == pytest.approx(float(record["started_at"]))


def test_a_pending_claim_is_sent_once_its_call_is_on_the_wire(r: redis.Redis) -> None:
    """Built before the llama-server call, it writes nothing until the task sends it (the
    call's request is out) or asks for the verdict; the verdict is read once."""
    job = _job(stream=True)
    pending = ledger.PendingClaim(r, job, "w1", 60)
    assert r.get(redis_keys.claim_key(job.request_id)) is None and _record(r, job) == {}
    pending.send()
    pending.send()  # once only
    assert pending.result() is Claim.FIRST and pending.result() is Claim.FIRST
    assert (
        r.get(redis_keys.claim_key(job.request_id)) == b"w1" and _record(r, job)["worker"] == "w1"
    )
    unsent = ledger.PendingClaim(r, _job(stream=True), "w2", 60)
    assert unsent.result() is Claim.FIRST  # a call that failed before its request went out


def test_cancelled_while_queued_is_neither_claimed_nor_recorded(r: redis.Redis) -> None:
    job = _job(stream=True)
    r.set(redis_keys.cancel_key(job.request_id), "1", ex=60)
    assert claim(r, job, "w1", 60) is Claim.CANCELLED
    assert r.get(redis_keys.claim_key(job.request_id)) is None
    assert _record(r, job) == {} and _running(r, job) == []


def test_first_claim_wins_and_a_live_owner_makes_copies_duplicates(r: redis.Redis) -> None:
    job = _job(stream=True)
    r.set(redis_keys.worker_key("alive"), "{}", ex=30)
    assert claim(r, job, "alive", 60) is Claim.FIRST
    assert claim(r, job, "other", 60) is Claim.DUPLICATE
    assert _record(r, job)["worker"] == "alive"  # the copy wrote nothing
    assert _running(r, job) == [running_member("alive", job.request_id)]
    job_ns = _job(stream=False)
    assert claim(r, job_ns, "alive", 60) is Claim.FIRST
    assert claim(r, job_ns, "other", 60) is Claim.DUPLICATE  # alive: no rerun either


def test_a_copy_back_at_its_own_live_worker_is_not_a_duplicate(r: redis.Redis) -> None:
    """The worker is alive but its run of the task is over (a pool child killed, Celery
    queued the task again): a stream is lost, a non-streaming task runs once more."""
    r.set(redis_keys.worker_key("same"), "{}", ex=30)
    job, job_ns = _job(stream=True), _job(stream=False)
    assert claim(r, job, "same", 60) is Claim.FIRST
    assert claim(r, job, "same", 60) is Claim.LOST
    assert claim(r, job_ns, "same", 60) is Claim.FIRST
    assert claim(r, job_ns, "same", 60) is Claim.RERUN
    assert claim(r, job_ns, "same", 60) is Claim.DUPLICATE  # never a third run


def test_a_copy_of_a_task_whose_pool_child_died_is_settled_anywhere(r: redis.Redis) -> None:
    """The worker lives on but its pool child died mid-task: its main process marks the
    claim lost, and a copy on any other live replica is settled as if the worker had died
    (it used to be a duplicate, dropped with nothing said to the client)."""
    for name in ("w1", "w2", "w3"):
        r.set(redis_keys.worker_key(name), "{}", ex=30)
    job, job_ns = _job(stream=True), _job(stream=False)
    for j in (job, job_ns):
        assert claim(r, j, "w1", 60) is Claim.FIRST
        ledger.child_lost(r, j, "w1")
        assert _running(r, j) == []  # not counted as running on w1 any more
    assert claim(r, job, "w2", 60) is Claim.LOST
    assert claim(r, job_ns, "w2", 60) is Claim.RERUN
    ledger.child_lost(r, job_ns, "w2")  # the rerun's child died too
    assert claim(r, job_ns, "w3", 60) is Claim.LOST  # no third run, but said so
    unclaimed = _job(stream=True)
    ledger.child_lost(r, unclaimed, "w1")  # never claimed: nothing is written
    assert r.get(redis_keys.claim_key(unclaimed.request_id)) is None


def test_redelivered_stream_of_a_dead_worker_is_lost_not_rerun(r: redis.Redis) -> None:
    job = _job(stream=True)
    assert claim(r, job, "dead-worker", 60) is Claim.FIRST  # no heartbeat key: dead
    assert claim(r, job, "w2", 60) is Claim.LOST
    assert claim(r, job, "w3", 60) is Claim.LOST
    assert _record(r, job)["worker"] == "dead-worker"


def test_non_streaming_task_of_a_dead_worker_runs_exactly_once_more(r: redis.Redis) -> None:
    job = _job(stream=False)
    assert claim(r, job, "dead-worker", 60) is Claim.FIRST
    assert claim(r, job, "w2", 60) is Claim.RERUN
    assert r.get(redis_keys.claim_key(job.request_id)) == b"w2"
    record = _record(r, job)  # the rerun says who runs it now
    assert record["worker"] == "w2" and record["state"] == RequestState.RUNNING.value
    assert running_member("w2", job.request_id) in _running(r, job)
    assert claim(r, job, "w3", 60) is Claim.DUPLICATE  # w2 is dead too, but no third run


def test_a_cancel_wins_over_a_redelivery(r: redis.Redis) -> None:
    job = _job(stream=False)
    assert claim(r, job, "dead-worker", 60) is Claim.FIRST
    r.set(redis_keys.cancel_key(job.request_id), "1", ex=60)
    assert claim(r, job, "w2", 60) is Claim.CANCELLED
    assert r.get(redis_keys.claim_key(job.request_id)) == b"dead-worker"


def test_a_decoding_client_reads_the_same_outcomes(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        job = _job(stream=True)
        assert claim(client, job, "dead-worker", 60) is Claim.FIRST
        assert claim(client, job, "w2", 60) is Claim.LOST
    finally:
        client.close()


def test_a_claim_whose_reply_was_lost_raises_again_when_asked_again(r: redis.Redis) -> None:
    """The task reads the claim right after sending its request and, if that call failed
    first, once more after it: both must report the lost reply, not trip on the state."""
    pending = ledger.PendingClaim(r, _job(stream=True), "w-lost", 60)
    pending.send()
    assert pending._conn is not None
    pending._conn.disconnect()  # the reply is gone with the connection
    with pytest.raises(redis.ConnectionError):
        pending.result()
    with pytest.raises(redis.ConnectionError):
        pending.result()
