"""Where a batch item's result goes instead of a pub/sub channel: the batch's results hash,
written once per item by `common.batch.RECORD_RESULT_LUA` (a redelivered item is never
written nor counted twice; nothing is recorded once the batch is being finalized)."""

from __future__ import annotations

import json
from typing import Any

import redis

from common import redis_keys
from common.batch import RECORD_RESULT_LUA, BatchState, result_line
from common.errors import CorralError
from common.jobs import Job

STOPPED = {
    BatchState.CANCELLING.value,
    BatchState.CANCELLED.value,
    BatchState.EXPIRED.value,
    BatchState.FAILED.value,
}


def has_result(r: redis.Redis, job: Job) -> bool:
    assert job.batch_id and job.custom_id
    return bool(r.hexists(redis_keys.batch_results_key(job.batch_id), job.custom_id))


def is_stopped(r: redis.Redis, job: Job) -> bool:
    """The batch was cancelled or expired: items not started yet are skipped."""
    assert job.batch_id
    status = r.hget(redis_keys.batch_key(job.batch_id), "status")
    return status is not None and redis_keys.text(status) in STOPPED


def _record(r: redis.Redis, job: Job, line: dict[str, Any], counter: str) -> bool:
    assert job.batch_id and job.custom_id
    script = r.register_script(RECORD_RESULT_LUA)
    keys_ = [redis_keys.batch_results_key(job.batch_id), redis_keys.batch_key(job.batch_id)]
    return int(script(keys=keys_, args=[job.custom_id, json.dumps(line), counter])) >= 0


def record_success(r: redis.Redis, job: Job, body: dict[str, Any]) -> bool:
    """True if this was the item's first result (False: a redelivery, or too late)."""
    assert job.custom_id
    response = {"status_code": 200, "request_id": job.request_id, "body": body}
    return _record(r, job, result_line(job.request_id, job.custom_id, response), "completed")


def record_failure(r: redis.Redis, job: Job, err: CorralError) -> bool:
    assert job.custom_id
    response = {"status_code": err.status, "request_id": job.request_id, "body": err.envelope()}
    error = {"code": err.code or err.type, "message": err.message}
    line = result_line(job.request_id, job.custom_id, response, error)
    return _record(r, job, line, "failed")


def record_skip(r: redis.Redis, job: Job) -> bool:
    """Counted, so the batch can finish, but left out of both output files."""
    return _record(r, job, {"skipped": True}, "skipped")
