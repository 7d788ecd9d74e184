"""The worker's main process when a pool child dies in the middle of a task (the kernel's
OOM killer, a crash): Celery queues the task again (`task_reject_on_worker_lost`), and the
copy may go to any replica. The claim still names this worker, which is alive, so the copy
would be dropped as a duplicate while the client heard nothing until its deadline. So,
before Celery queues the copy, the main process marks the claim lost (`ledger.child_lost`)
and the copy is settled like one of a dead worker: a stream is lost and its client told,
a non-streaming task runs once more. A batch item leaves the running set, for its batch
supervisor to count it as lost."""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request
from redis.exceptions import RedisError

from common.jobs import Job
from workers.task import ledger, runtime

log = logging.getLogger(__name__)


class InferRequest(Request):
    """Celery's request for `corral.infer`, in the worker's main process."""

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            settle(self.args[0] if self.args else {})
        super().on_failure(exc_info, send_failed_event, return_ok)


def settle(payload: dict[str, Any]) -> None:
    """Mark the task whose pool child died so its copy is not taken for a duplicate."""
    try:
        job = Job.model_validate(payload)
        rt = runtime.current()
        if job.batch_id is not None:
            ledger.given_back(rt.redis, job, rt.worker_id, "its worker process was lost")
        else:
            ledger.child_lost(rt.redis, job, rt.worker_id)
        log.warning("job=%s pool child lost mid-task; its copy is settled as lost", job.request_id)
    except (ValueError, RedisError) as exc:  # Celery's own handling must go on regardless
        log.error("a lost pool child's task could not be settled: %r", exc)
