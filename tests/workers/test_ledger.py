"""Claims on a real Valkey: a redelivered task never streams twice, and a non-streaming
one runs at most once more, only when its first worker is dead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common import keys
from common.jobs import Job, JobKind
from corral.redis_server import EmbeddedRedis
from workers.ledger import Claim, claim


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _job(stream: bool) -> Job:
    return Job(kind=JobKind.CHAT, model="m", body={}, stream=stream, channel="c", deadline=9e9)


def test_first_claim_wins_and_a_live_owner_makes_copies_duplicates(r: redis.Redis) -> None:
    job = _job(stream=True)
    r.set(keys.worker_key("alive"), "{}", ex=30)
    assert claim(r, job, "alive", 60) is Claim.FIRST
    assert claim(r, job, "other", 60) is Claim.DUPLICATE


def test_redelivered_stream_of_a_dead_worker_is_lost_not_rerun(r: redis.Redis) -> None:
    job = _job(stream=True)
    assert claim(r, job, "dead-worker", 60) is Claim.FIRST  # no heartbeat key: dead
    assert claim(r, job, "w2", 60) is Claim.LOST
    assert claim(r, job, "w3", 60) is Claim.LOST


def test_non_streaming_task_of_a_dead_worker_runs_exactly_once_more(r: redis.Redis) -> None:
    job = _job(stream=False)
    assert claim(r, job, "dead-worker", 60) is Claim.FIRST
    assert claim(r, job, "w2", 60) is Claim.RERUN
    assert r.get(keys.claim_key(job.request_id)) == b"w2"
    assert claim(r, job, "w3", 60) is Claim.DUPLICATE  # w2 is dead too, but no third run
