"""Step 3 of the request path: the Celery task a worker runs for each request.

It drops work that should not run (deadline passed, cancelled while queued, a redelivered
copy of a task another worker claimed), then calls llama-server and hands what comes back
to the publisher. Every exit publishes exactly one final frame.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from common import keys
from common.errors import CorralError, Timeout, WorkerLost
from common.frames import Frame, FrameType
from common.jobs import Job, JobKind
from workers import runtime
from workers.celery_app import app
from workers.publisher import Publisher
from workers.upstream import Abort, Aborted

log = logging.getLogger(__name__)


@app.task(name=keys.INFER_TASK, bind=True)
def infer(self: Task, payload: dict[str, Any]) -> None:
    job = Job.model_validate(payload)
    rt = runtime.current()
    r = rt.redis
    if job.expired():
        log.info("job=%s model=%s dropped: deadline passed in queue", job.request_id, job.model)
        _publish_error(job, Timeout("The request waited in the queue past its deadline."))
        return
    if r.exists(keys.cancel_key(job.request_id)):
        log.info("job=%s model=%s dropped: cancelled while queued", job.request_id, job.model)
        return
    claim_ttl = int(rt.settings.visibility_timeout or rt.settings.task_time_limit * 2)
    if not r.set(keys.claim_key(job.request_id), rt.worker_id, nx=True, ex=claim_ttl):
        _on_redelivered(job)
        return
    started = time.monotonic()
    log.info(
        "job=%s model=%s priority=%s worker=%s started waited_ms=%d",
        job.request_id, job.model, job.priority.value, rt.worker_id,
        (time.time() - job.enqueued_at) * 1000,
    )  # fmt: skip
    outcome = _run(job)
    log.info(
        "job=%s worker=%s finished outcome=%s ms=%d",
        job.request_id, rt.worker_id, outcome, (time.monotonic() - started) * 1000,
    )  # fmt: skip


def _run(job: Job) -> str:
    rt = runtime.current()
    abort = Abort()
    pub = Publisher(
        rt.redis,
        job.channel,
        keys.cancel_key(job.request_id),
        rt.worker_id,
        interval=rt.settings.flush_interval_ms / 1000,
        on_cancel=abort.fire,
    )
    pub.start()
    body = dict(job.body, model=job.model)
    try:
        if job.stream and job.kind is not JobKind.EMBEDDING:
            body["stream"] = True
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body["stream_options"] = {"include_usage": True}
            end = rt.upstream.stream(job.kind.path, body, pub.chunk, abort)
            if wants_usage and end.usage_chunk:
                pub.chunk(end.usage_chunk)
            pub.finish(FrameType.DONE, usage=end.usage)
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
            result = rt.upstream.request(job.kind.path, body, abort)
            pub.finish(FrameType.RESULT, body=result, usage=result.get("usage"))
        return "ok"
    except Aborted:
        pub.finish(FrameType.ERROR, error=_cancelled().body(), status=499)
        return "cancelled"
    except CorralError as exc:
        pub.finish(FrameType.ERROR, error=exc.body(), status=exc.status)
        return f"error:{exc.code}"


def _cancelled() -> CorralError:
    return CorralError("The request was cancelled.", code="cancelled")


def _on_redelivered(job: Job) -> None:
    """Another worker claimed this task before. If that worker is alive the copy is a
    duplicate and vanishes; if it died, the stream it served is broken: say so."""
    r = runtime.current().redis
    owner = r.get(keys.claim_key(job.request_id))
    if owner is not None and r.exists(keys.worker_key(_text(owner))):
        log.info("job=%s duplicate delivery dropped (owner %s alive)", job.request_id, owner)
        return
    log.warning("job=%s redelivered after its worker was lost; not run twice", job.request_id)
    _publish_error(job, WorkerLost("The worker serving this request was lost."))


def _publish_error(job: Job, err: CorralError) -> None:
    frame = Frame(seq=0, type=FrameType.ERROR, error=err.body(), status=err.status)
    runtime.current().redis.publish(job.channel, frame.model_dump_json(exclude_defaults=True))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
