"""Where a batch item's result goes instead of a pub/sub channel: the batch's results hash.

`HSETNX` on the item's `custom_id` and the matching counter increment run as one Lua
script, so a redelivered item (kill -9 of a worker mid-batch) can never be written twice
nor counted twice, and the counters always add up to the results present; the same script
refuses a result once the batch is being finalized (see `_RECORD`), so the counters also
add up to the lines of its files.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis

from common import redis_keys
from common.batch import BatchState, OutputLine
from common.errors import CorralError
from common.jobs import Job

# Only into a batch still running (in progress, or cancelling: running items finish and
# are reported): once the supervisor has marked it finalizing it reads the results to write
# the files, and a result recorded after that would be counted but in no file.
_RECORD = f"""
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= '{BatchState.IN_PROGRESS.value}' and status ~= '{BatchState.CANCELLING.value}' then
  return -2
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
return -1
"""

STOPPED = {
    BatchState.CANCELLING.value,
    BatchState.CANCELLED.value,
    BatchState.EXPIRED.value,
    BatchState.FAILED.value,
}


def has_result(r: redis.Redis, job: Job) -> bool:
    assert job.batch_id and job.custom_id
    return bool(r.hexists(redis_keys.batch_results_key(job.batch_id), job.custom_id))


def stopped(r: redis.Redis, job: Job) -> bool:
    """The batch was cancelled or expired: items not started yet are skipped."""
    assert job.batch_id
    status = r.hget(redis_keys.batch_key(job.batch_id), "status")
    return status is not None and redis_keys.text(status) in STOPPED


def _record(r: redis.Redis, job: Job, line: dict[str, Any], counter: str) -> bool:
    assert job.batch_id and job.custom_id
    script = r.register_script(_RECORD)
    keys_ = [redis_keys.batch_results_key(job.batch_id), redis_keys.batch_key(job.batch_id)]
    return int(script(keys=keys_, args=[job.custom_id, json.dumps(line), counter])) >= 0


def succeeded(r: redis.Redis, job: Job, body: dict[str, Any]) -> bool:
    line = _line(job, {"status_code": 200, "request_id": job.request_id, "body": body}, None)
    return _record(r, job, line, "completed")


def failed(r: redis.Redis, job: Job, err: CorralError) -> bool:
    response = {"status_code": err.status, "request_id": job.request_id, "body": err.envelope()}
    line = _line(job, response, {"code": err.code or err.type, "message": err.message})
    return _record(r, job, line, "failed")


def skipped(r: redis.Redis, job: Job) -> bool:
    """Counted, so the batch can finish, but left out of both output files."""
    return _record(r, job, {"skipped": True}, "skipped")


def _line(job: Job, response: dict[str, Any], error: dict[str, Any] | None) -> dict[str, Any]:
    assert job.custom_id
    out = OutputLine(
        id=f"batch_req_{uuid.uuid4().hex}", custom_id=job.custom_id, response=response, error=error
    )
    return out.model_dump()
