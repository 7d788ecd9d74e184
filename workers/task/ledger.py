"""What a worker writes about the tasks it takes: the claim that makes each task run once,
and the request record's running/finished state (`common.tracking`).

A task's first delivery is the hot path: one Lua script checks the cancel key, takes the
claim and writes the running record in one round trip, sent and read once the task's
llama-server request is on the wire (`PendingClaim`). Redeliveries take the slower Python
path below.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import NoScriptError

from common import redis_keys, telemetry
from common.affinity import AFFINITY_TTL_S
from common.jobs import Job
from common.telemetry import Outcome
from common.tracking import RECORD_TTL_S, RequestState, running_member

log = logging.getLogger(__name__)


class Claim(StrEnum):
    FIRST = "first"  # nobody ran this task before: run it
    RERUN = "rerun"  # its first worker died; a non-streaming task runs once more
    DUPLICATE = "duplicate"  # its owner is alive and on it: drop this copy
    LOST = "lost"  # a streaming task whose worker died: its stream cannot be resumed
    CANCELLED = "cancelled"  # cancelled while queued: nobody claimed it, drop it unrun


# KEYS: cancel, claim, record, running set, the request's affinity key
# (`redis_keys.affinity_key`), then the model's live sets (the request leaves them: it is
# no longer waiting). ARGV: worker id, claim TTL, start time, running member, request id,
# the affinity key's TTL (0: the request has none), then the record's field/value pairs.
# Returns {"cancelled"}, {"first"} (claimed, record written) or {"taken", <owner>}.
_BEGIN_LUA = """
for i = 6, #KEYS do redis.call('ZREM', KEYS[i], ARGV[5]) end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'cancelled'} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HSET', KEYS[3], unpack(ARGV, 7))
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
  if ARGV[6] ~= '0' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[6]) end
  return {'first'}
end
return {'taken', redis.call('GET', KEYS[2])}
"""
_begin: Script | None = None  # registered lazily, once per process


class PendingClaim:
    """A claim whose round trip overlaps the task's llama-server call instead of preceding
    it (it was on the path of every first token): the task sends it and reads the answer
    (`result`)
    as soon as its request is on the wire, before it publishes anything, and cuts the call
    if the task is not its to run. Built before the call, it does nothing until then:
    building and sending it first (the record's fields, a pooled connection) made the
    request reach llama-server later."""

    def __init__(self, r: redis.Redis, job: Job, worker_id: str, ttl: int) -> None:
        self._r, self._job, self._worker_id, self._ttl = r, job, worker_id, ttl
        self._keys: list[str] = []
        self._args: list[Any] = []
        self._conn: Connection | None = None
        self._sent = False
        self._claim: Claim | None = None
        self._failed: BaseException | None = None  # why the reply could not be read

    def send(self) -> None:
        """Send the claim script (once); `result` reads its reply."""
        global _begin
        if self._sent:
            return
        self._sent = True
        if _begin is None:
            _begin = self._r.register_script(_BEGIN_LUA)
        job, worker_id, now = self._job, self._worker_id, time.time()
        request_id = job.request_id
        self._keys = [
            redis_keys.cancel_key(request_id),
            redis_keys.claim_key(request_id),
            redis_keys.request_key(request_id),
            redis_keys.running_key(job.model),
            redis_keys.affinity_key(job.model, job.affinity or "-"),
            *redis_keys.live_keys(job.model),
        ]
        member = running_member(worker_id, request_id)
        remember = AFFINITY_TTL_S if job.affinity else 0  # this replica holds its prefix now
        self._args = [worker_id, self._ttl, now, member, request_id, remember]
        for name, value in _record(job, worker_id, now).items():
            self._args += (name, value)
        self._conn = self._r.connection_pool.get_connection()
        try:
            self._conn.send_command(
                "EVALSHA", _begin.sha, len(self._keys), *self._keys, *self._args
            )
        except BaseException:
            self._release(broken=True)
            raise

    def result(self) -> Claim:
        """The verdict (read once; later calls return it, or raise what reading it did)."""
        if self._failed is not None:
            raise self._failed
        if self._claim is None:
            try:
                self.send()
                self._claim = self._verdict(self._reply())
            except Exception as exc:
                self._failed = exc
                raise
        return self._claim

    def _reply(self) -> Any:
        conn = self._conn
        assert conn is not None
        try:
            reply = conn.read_response()
        except NoScriptError:  # Redis restarted, or flushed its scripts: EVAL loads it
            self._release()
            assert _begin is not None
            return _begin(self._keys, self._args, client=self._r)
        except BaseException:
            self._release(broken=True)
            raise
        self._release()
        return reply

    def _verdict(self, reply: Any) -> Claim:
        outcome = redis_keys.text(reply[0])
        if outcome == "cancelled":
            return Claim.CANCELLED
        if outcome == "first":
            return Claim.FIRST
        return _redelivered(self._r, self._job, self._worker_id, self._ttl, reply[1])

    def _release(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken:
            conn.disconnect()
        self._r.connection_pool.release(conn)


LOST = "lost:"  # a claim's value once its worker's pool child died running it: "lost:<id>"


def child_lost(r: redis.Redis, job: Job, worker_id: str) -> None:
    """The pool child running `job` died (the worker's main process tells): its claim is
    marked lost, so the copy Celery queues again is settled like one of a dead worker,
    whichever replica takes it (a stream: lost, its client told; a non-streaming task:
    run once more). Left naming this live worker, the copy was dropped as a duplicate
    and its client heard nothing until its deadline."""
    pipe = r.pipeline(transaction=False)
    pipe.set(redis_keys.claim_key(job.request_id), LOST + worker_id, xx=True, keepttl=True)
    pipe.zrem(redis_keys.running_key(job.model), running_member(worker_id, job.request_id))
    pipe.execute()


def _redelivered(
    r: redis.Redis, job: Job, worker_id: str, ttl: int, owner: bytes | str | None
) -> Claim:
    """Someone claimed this task before: rare, so plain commands, correctness first.

    A copy that comes back to the worker that claimed it finds that worker alive, but its
    own run is over: its pool child died (killed for memory, say) and Celery queued the
    task again, or kombu redelivered it after the visibility timeout, twice the time limit.
    So only another live owner makes a duplicate; a stream that came back here is lost (its
    client gets an error rather than silence until its deadline), a non-streaming task
    runs once more."""
    key = redis_keys.claim_key(job.request_id)
    holder = redis_keys.text(owner) if owner is not None else None
    lost = holder is not None and holder.startswith(LOST)
    if (
        holder is not None
        and not lost
        and holder != worker_id
        and r.exists(redis_keys.worker_key(holder))
    ):
        return Claim.DUPLICATE
    if _ended(r, job):  # its run ended and was answered: a late copy (a broker blip)
        return Claim.DUPLICATE
    if job.stream:
        return Claim.LOST
    if r.set(f"{key}:rerun", worker_id, nx=True, ex=ttl):
        r.set(key, worker_id, ex=ttl)
        started(r, job, worker_id)
        return Claim.RERUN
    # No third run. A dead worker's loss its gateway sees (the heartbeat); a pool child's
    # only the verdict can tell, or the client would wait for its deadline.
    return Claim.LOST if lost else Claim.DUPLICATE


def _ended(r: redis.Redis, job: Job) -> bool:
    """Whether the request's record says its run ended (done, failed, cancelled...)."""
    state = r.hget(redis_keys.request_key(job.request_id), "state")
    return state is not None and RequestState(redis_keys.text(state)).final


def _record(job: Job, worker_id: str, now: float) -> dict[Any, Any]:
    """The running record's fields: one definition for the script and `started`."""
    return {
        "request_id": job.request_id,
        "model": job.model,
        "priority": job.priority.value,
        "enqueued_at": job.enqueued_at,
        "stream": str(job.stream).lower(),
        "state": RequestState.RUNNING.value,
        "started_at": now,
        "worker": worker_id,
    }


def started(r: redis.Redis, job: Job, worker_id: str) -> None:
    """The running record of a task that runs without a first claim (a rerun, a batch
    item)."""
    now = time.time()
    pipe = r.pipeline(transaction=False)
    pipe.hset(redis_keys.request_key(job.request_id), mapping=_record(job, worker_id, now))
    pipe.zadd(redis_keys.running_key(job.model), {running_member(worker_id, job.request_id): now})
    if job.affinity:
        pipe.set(redis_keys.affinity_key(job.model, job.affinity), worker_id, ex=AFFINITY_TTL_S)
    pipe.execute()


def finished(
    r: redis.Redis,
    job: Job,
    worker_id: str,
    state: RequestState,
    error: str | None = None,
    outcome: Outcome | None = None,
) -> None:
    pipe = r.pipeline(transaction=False)
    finish_into(pipe, job=job, worker_id=worker_id, state=state, error=error, outcome=outcome)
    try:
        pipe.execute()
    except redis.RedisError as exc:  # the reply already went out; the record is secondary
        log.warning("job=%s could not record its end: %r", job.request_id, exc)


def finish_into(
    pipe: redis.client.Pipeline,
    *,
    job: Job,
    worker_id: str,
    state: RequestState,
    error: str | None = None,
    outcome: Outcome | None = None,
) -> None:
    """Queue the record's end on `pipe`: the publisher sends it with the final frame, in one
    round trip, so the slot is handed back to Celery that much sooner. With `outcome`, the
    record shows what was measured and the model's telemetry counts it (one more command
    in the same round trip)."""
    now = time.time()
    fields: dict[Any, Any] = {"state": state.value, "finished_at": str(now)}
    if error:
        fields["error"] = error[:500]
    if outcome is not None:
        fields.update(outcome.record_fields())
        telemetry_into(pipe, job.model, outcome, now)
    pipe.hset(redis_keys.request_key(job.request_id), mapping=fields)
    pipe.expire(redis_keys.request_key(job.request_id), RECORD_TTL_S)
    pipe.zrem(redis_keys.running_key(job.model), running_member(worker_id, job.request_id))


def given_back(r: redis.Redis, job: Job, worker_id: str, why: str) -> None:
    """A batch item given up without an outcome (its llama-server went away): out of the
    model's running set, so the batch supervisor sees nothing running and sends it again;
    its record says it waits for that."""
    pipe = r.pipeline(transaction=False)
    pipe.hset(
        redis_keys.request_key(job.request_id),
        mapping={"state": RequestState.QUEUED.value, "error": why[:500]},
    )
    pipe.expire(redis_keys.request_key(job.request_id), RECORD_TTL_S)
    pipe.zrem(redis_keys.running_key(job.model), running_member(worker_id, job.request_id))
    try:
        pipe.execute()
    except redis.RedisError as exc:  # the supervisor's requeue of lost workers is the net
        log.warning("job=%s could not give the item back: %r", job.request_id, exc)


def dropped(r: redis.Redis, job: Job, state: RequestState, why: str) -> None:
    """A task that never ran: say why in its record, and count it in its model's telemetry."""
    now = time.time()
    pipe = r.pipeline(transaction=False)
    pipe.hset(
        redis_keys.request_key(job.request_id),
        mapping={"state": state.value, "finished_at": str(now), "error": why},
    )
    pipe.expire(redis_keys.request_key(job.request_id), RECORD_TTL_S)
    for live in redis_keys.live_keys(job.model):
        pipe.zrem(live, job.request_id)
    waited = (now - job.enqueued_at) * 1000 if state is RequestState.EXPIRED else None
    outcome = Outcome(state, interactive=job.batch_id is None, wait_ms=waited)
    telemetry_into(pipe, job.model, outcome, now)
    pipe.execute()


def telemetry_into(pipe: redis.client.Pipeline, model: str, outcome: Outcome, now: float) -> None:
    """Count a request's `outcome` into its model's telemetry buckets (`common.telemetry`):
    one EVAL of the script's text, never EVALSHA, so a Redis that forgot its scripts
    costs no extra round trip (nor a lost final frame)."""
    keys, args = telemetry.record_args(model, outcome, now)
    pipe.eval(telemetry.RECORD_LUA, len(keys), *keys, *args)
