"""Step 3 of the request path: the Celery task a worker runs for each request.

It drops work that should not run: a task whose deadline passed, at once; one cancelled
while queued or a redelivered copy of a task another worker claimed, when its claim is
read, right after its llama-server call was sent (the call is cut before anything is
published: the claim's round trip overlaps llama-server's work instead of preceding it).
Otherwise it hands what llama-server sends back to the publisher. A request the client
wants whole is streamed from llama-server all the same and assembled here
(`workers.task.assemble`): a cancel, the client leaving or the time limit then close a
stream, which stops the generation at once. Every task that runs publishes exactly one
final frame; a task dropped publishes none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import RedisError

from common import redis_keys
from common.errors import Cancelled, CorralError, Timeout, WorkerLost
from common.frames import FrameType, out_of_band_error
from common.jobs import Job, JobKind
from common.tracking import RequestState
from workers.consumer.celery_app import app
from workers.consumer.drain import DRAIN
from workers.task import batch_sink, ledger, outcome, runtime
from workers.task.assemble import whole_reply
from workers.task.ledger import Claim
from workers.task.publisher import Publisher
from workers.task.upstream import UNREACHABLE, Abort, Aborted, Upstream

log = logging.getLogger(__name__)

LOST_WAIT_S = 2.0  # for the manager to stop serving a model whose child died


@app.task(name=redis_keys.INFER_TASK, bind=True, Request="workers.consumer.child_lost:InferRequest")
def infer(self: Task, payload: dict[str, Any]) -> None:
    job = Job.model_validate(payload)
    rt = runtime.current()
    rt.require_serving(job.model)  # else back to its queue
    if job.batch_id is not None:
        _run_batch_item(job)
        return
    r = rt.redis
    if job.expired():
        log.info("job=%s model=%s dropped: deadline passed in queue", job.request_id, job.model)
        ledger.dropped(r, job, RequestState.EXPIRED, "deadline passed while queued")
        _publish_error(job, Timeout("The request waited in the queue past its deadline."))
        return
    claim_ttl = int(rt.settings.visibility_timeout or rt.settings.task_time_limit * 2)
    claim = ledger.PendingClaim(r, job, rt.worker_id, claim_ttl)  # and the running record
    started = time.monotonic()
    try:
        state, _ = _run(job, claim)
    except NotOurs as exc:
        _drop(job, exc.claim)
        return
    log.info(
        "job=%s worker=%s finished state=%s ms=%d",
        job.request_id,
        rt.worker_id,
        state.value,
        (time.monotonic() - started) * 1000,
    )


class NotOurs(Exception):
    """The claim's verdict: this task is not this worker's to run (see `_drop`)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim.value)
        self.claim = claim


def _ours(claim: ledger.PendingClaim) -> Claim:
    """The claim's verdict if the task is ours to run; else `NotOurs`."""
    verdict = claim.result()
    if verdict not in (Claim.FIRST, Claim.RERUN):
        raise NotOurs(verdict)
    return verdict


def _confirm(job: Job, claim: ledger.PendingClaim, pub: Publisher) -> None:
    """Once the llama-server request is on the wire: read the claim and, if the task is
    ours, start publishing; else `NotOurs` cuts the call before anything was published."""
    verdict = _ours(claim)
    pub.start()
    log.info(
        "job=%s model=%s priority=%s worker=%s started claim=%s waited_ms=%d",
        job.request_id,
        job.model,
        job.priority.value,
        runtime.current().worker_id,
        verdict.value,
        (time.time() - job.enqueued_at) * 1000,
    )


def _drop(job: Job, claim: Claim) -> None:
    """A task that is not ours to run; its llama-server call, cut at once, freed its slot."""
    r = runtime.current().redis
    if claim is Claim.CANCELLED:
        log.info("job=%s model=%s dropped: cancelled while queued", job.request_id, job.model)
        ledger.dropped(r, job, RequestState.CANCELLED, "cancelled while queued")
    elif claim is Claim.DUPLICATE:
        log.info("job=%s duplicate delivery dropped", job.request_id)
    else:
        log.warning(
            "job=%s redelivered after its worker was lost; not streamed twice", job.request_id
        )
        ledger.dropped(r, job, RequestState.FAILED, "worker lost mid-stream")
        _publish_error(job, WorkerLost("The worker serving this request was lost."))


def _run(job: Job, claim: ledger.PendingClaim) -> tuple[RequestState, str | None]:
    """Call llama-server, relay what it sends, and end with one final frame; the record's
    end goes out in the same round trip as that frame. The claim is read once the request
    is sent (`_confirm`): its round trip overlaps llama-server's work."""
    rt = runtime.current()
    abort = Abort()
    pub = Publisher(
        rt.redis,
        job.channel,
        redis_keys.cancel_key(job.request_id),
        rt.worker_id,
        interval=rt.settings.flush_interval_ms / 1000,
        on_cancel=abort.fire,
    )
    on_sent = functools.partial(_confirm, job, claim, pub)
    began = time.time()
    state, error, final, fields, timings = _call_upstream(
        job, claim, rt.upstream(job.model), pub, abort, on_sent
    )
    try:
        _ours(claim)  # read by `_confirm` already, unless the call failed before it was sent
    except RedisError as exc:  # whose task this is stays unknown: nothing was published yet
        log.error("job=%s could not read its claim: %r", job.request_id, exc)
        with contextlib.suppress(RedisError):  # Redis gone: the gateway ends the stream
            _publish_error(
                job,
                CorralError(
                    "The worker could not reach Redis to start this request; retry it.",
                    code="redis_unavailable",
                    status=503,
                ),
            )
        return RequestState.FAILED, "claim unreadable"
    measured = outcome.measured(job, state, began, pub.first_chunk_at, fields.get("usage"), timings)
    record = functools.partial(
        ledger.finish_into,
        job=job,
        worker_id=rt.worker_id,
        state=state,
        error=error,
        outcome=measured,
    )
    pub.finish(final, also=record, **fields)
    return state, error


# The end of a call: its state, error, final frame type and fields, llama-server's timings.
RunEnd = tuple[RequestState, str | None, FrameType, dict[str, Any], dict[str, Any] | None]


def _call_upstream(
    job: Job,
    claim: ledger.PendingClaim,
    upstream: Upstream,
    pub: Publisher,
    abort: Abort,
    on_sent: Callable[[], None],
) -> RunEnd:
    body = dict(job.body, model=job.model)
    try:
        if job.stream and job.kind is not JobKind.EMBEDDING:
            body["stream"] = True
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body["stream_options"] = {"include_usage": True}
            end = upstream.stream(job.kind.path, body, pub.chunk, abort, on_sent, pub.accepted)
            if wants_usage and end.usage_chunk:
                pub.chunk(end.usage_chunk)
            return RequestState.DONE, None, FrameType.DONE, {"usage": end.usage}, end.timings
        result = whole_reply(upstream, job.kind, body, abort, on_sent)
        return (
            RequestState.DONE,
            None,
            FrameType.RESULT,
            {"body": result, "usage": result.get("usage")},
            result.get("timings"),
        )
    except NotOurs:
        raise
    except Aborted:
        if _given_up(job):
            lost = _handed_back(job, claim)
            return RequestState.FAILED, lost.message, FrameType.ERROR, _error(lost), None
        cancel = _error(Cancelled())
        return RequestState.CANCELLED, "cancelled while running", FrameType.ERROR, cancel, None
    except SoftTimeLimitExceeded:  # the call's socket is closed: llama-server frees the slot
        late = _over_time_limit()
        return RequestState.FAILED, late.message, FrameType.ERROR, _error(late), None
    except CorralError as exc:
        if exc.code == UNREACHABLE:
            exc = _lost_llama_server(job, claim)
        return RequestState.FAILED, exc.message, FrameType.ERROR, _error(exc), None
    except Exception:  # a bug, or a reply nobody foresaw: still exactly one final frame
        log.exception("job=%s failed unexpectedly", job.request_id)
        err = CorralError("The worker failed while serving this request.")
        return RequestState.FAILED, err.message, FrameType.ERROR, _error(err), None


def _over_time_limit() -> CorralError:
    limit = runtime.current().settings.task_time_limit
    return Timeout(
        f"The request ran longer than the worker's task time limit ({limit:g} s).",
        code="task_time_limit",
    )


def _error(err: CorralError) -> dict[str, Any]:
    return {"error": err.body(), "status": err.status}


def _given_up(job: Job) -> bool:
    """Whether the cancel was this worker's own drain (`workers.consumer.drain`), not the
    client's."""
    raw = runtime.current().redis.get(redis_keys.cancel_key(job.request_id))
    return raw is not None and redis_keys.text(raw) == DRAIN


def _handed_back(job: Job, claim: ledger.PendingClaim) -> CorralError:
    """A request this stopping worker gave up: a whole reply is freed to run once more
    elsewhere (its claim and its drain mark go; the gateway queues it again, as after a
    lost worker), a stream's client is told."""
    if not job.stream:
        _ours(claim)
        keys = [redis_keys.claim_key(job.request_id), redis_keys.cancel_key(job.request_id)]
        runtime.current().redis.delete(*keys)
    return WorkerLost("The worker serving this request stopped before it was done; retry it.")


def _lost_llama_server(job: Job, claim: ledger.PendingClaim) -> CorralError:
    """llama-server went away mid-request (it crashed, or this worker was killed and took
    it down while a pool child still ran): that is a lost worker, not a bad request. The
    claim is released so the gateway's one resubmission of a non-streaming request can
    run, on another replica or on the restarted child.

    Released only once this task holds it: a call that failed before its request was sent
    has not taken the claim yet, and taking it after the release would leave it naming
    this worker (the resubmission, dropped as a duplicate, would leave its client waiting
    until its deadline). A copy that is not ours (`NotOurs`) releases nothing."""
    if not job.stream:
        _ours(claim)
        rt = runtime.current()
        # Said once this worker stops serving the model (its manager saw the child die), so
        # the run the gateway queues again is not taken by this worker before that.
        rt.serving.wait_not(job.model, LOST_WAIT_S)
        rt.redis.delete(redis_keys.claim_key(job.request_id))
    return WorkerLost("The llama-server serving this request went away mid-request.")


def _run_batch_item(job: Job) -> None:
    """A batch item: non-streaming, its result written once to the batch, not published."""
    rt = runtime.current()
    r = rt.redis
    if batch_sink.has_result(r, job):
        log.info("job=%s batch=%s already has a result; skipped", job.request_id, job.batch_id)
        return
    if batch_sink.is_stopped(r, job):
        batch_sink.record_skip(r, job)
        return
    if job.expired():
        batch_sink.record_failure(
            r, job, Timeout("The batch expired before this request ran.", code="batch_expired")
        )
        return
    # No claim: the results hash takes each custom_id once, and an item whose worker died
    # must be able to run again (the batch supervisor re-sends it, a bounded number of times).
    parent = os.getppid()
    ledger.started(r, job, rt.worker_id)
    began = time.time()
    body = dict(job.body, model=job.model)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    try:
        result = whole_reply(rt.upstream(job.model), job.kind, body, Abort())
        batch_sink.record_success(r, job, result)
        state, error = RequestState.DONE, None
        usage, timings = result.get("usage"), result.get("timings")
    except CorralError as exc:
        if exc.code == UNREACHABLE or os.getppid() != parent:
            # llama-server or this worker went away: not the request's fault. Leave no
            # result and nothing running, so the supervisor sends the item again.
            log.warning("job=%s batch=%s lost: %s", job.request_id, job.batch_id, exc.message)
            ledger.given_back(r, job, rt.worker_id, exc.message)
            return
        batch_sink.record_failure(r, job, exc)
        state, error = RequestState.FAILED, exc.message
    except SoftTimeLimitExceeded:
        err = _over_time_limit()
        batch_sink.record_failure(r, job, err)
        state, error = RequestState.FAILED, err.message
    except Exception:  # a bug, or a reply nobody foresaw: a failed item, not a stuck one
        log.exception("job=%s batch=%s failed unexpectedly", job.request_id, job.batch_id)
        err = CorralError("The worker failed while serving this request.")
        batch_sink.record_failure(r, job, err)
        state, error = RequestState.FAILED, err.message
    measured = outcome.measured(job, state, began, None, usage, timings)
    ledger.finished(r, job, rt.worker_id, state, error, measured)
    log.info(
        "job=%s batch=%s custom_id=%s %s", job.request_id, job.batch_id, job.custom_id, state.value
    )


def _publish_error(job: Job, err: CorralError) -> None:
    runtime.current().redis.publish(job.channel, out_of_band_error(err))
