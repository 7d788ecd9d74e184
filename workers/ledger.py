"""What a worker writes about the tasks it takes: the claim that makes each task run once,
and the request record's running/finished state (`common.tracking`)."""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import Any

import redis

from common import keys
from common.jobs import Job
from common.tracking import RECORD_TTL_S, RequestState, running_member

log = logging.getLogger(__name__)


class Claim(StrEnum):
    FIRST = "first"  # nobody ran this task before: run it
    RERUN = "rerun"  # its first worker died; a non-streaming task runs once more
    DUPLICATE = "duplicate"  # its owner is alive and on it: drop this copy
    LOST = "lost"  # a streaming task whose worker died: its stream cannot be resumed


def claim(r: redis.Redis, job: Job, worker_id: str, ttl: int) -> Claim:
    """Claim `job` for `worker_id`. A redelivered task (kombu redelivers unacked tasks
    after `visibility_timeout`, and the gateway resubmits a non-streaming request whose
    worker died) must never stream twice nor run more than twice in all."""
    key = keys.claim_key(job.request_id)
    if r.set(key, worker_id, nx=True, ex=ttl):
        return Claim.FIRST
    owner = r.get(key)
    if owner is not None and r.exists(keys.worker_key(keys.text(owner))):
        return Claim.DUPLICATE
    if job.stream:
        return Claim.LOST
    if r.set(f"{key}:rerun", worker_id, nx=True, ex=ttl):
        r.set(key, worker_id, ex=ttl)
        return Claim.RERUN
    return Claim.DUPLICATE


def started(r: redis.Redis, job: Job, worker_id: str) -> None:
    now = time.time()
    pipe = r.pipeline(transaction=False)
    fields: dict[Any, Any] = {
        "request_id": job.request_id, "model": job.model, "priority": job.priority.value,
        "enqueued_at": job.enqueued_at, "stream": str(job.stream).lower(),
        "state": RequestState.RUNNING.value, "started_at": now, "worker": worker_id,
    }  # fmt: skip
    pipe.hset(keys.request_key(job.request_id), mapping=fields)
    pipe.zadd(keys.running_key(job.model), {running_member(worker_id, job.request_id): now})
    pipe.execute()


def finished(
    r: redis.Redis, job: Job, worker_id: str, state: RequestState, error: str | None = None
) -> None:
    fields: dict[Any, Any] = {"state": state.value, "finished_at": str(time.time())}
    if error:
        fields["error"] = error[:500]
    pipe = r.pipeline(transaction=False)
    pipe.hset(keys.request_key(job.request_id), mapping=fields)
    pipe.expire(keys.request_key(job.request_id), RECORD_TTL_S)
    pipe.zrem(keys.running_key(job.model), running_member(worker_id, job.request_id))
    try:
        pipe.execute()
    except redis.RedisError as exc:  # the reply already went out; the record is secondary
        log.warning("job=%s could not record its end: %r", job.request_id, exc)


def dropped(r: redis.Redis, job: Job, state: RequestState, why: str) -> None:
    """A task that never ran: say why in its record."""
    pipe = r.pipeline(transaction=False)
    pipe.hset(
        keys.request_key(job.request_id),
        mapping={"state": state.value, "finished_at": str(time.time()), "error": why},
    )
    pipe.expire(keys.request_key(job.request_id), RECORD_TTL_S)
    pipe.execute()
