"""Every log line a task writes carries its request id (`common.logctx`), as in the gateway.

The task id *is* the request id (the gateway enqueues with `task_id=job.request_id`), so
Celery's prerun/postrun signals bind it without any code in the task itself. Connected in
the worker's main process before the pool forks, so every pool child has them.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_prerun

from common import logctx

_bound: dict[str, logctx.Bound] = {}


def _bind(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _bound[task_id] = logctx.bind(task_id)


def _unbind(task_id: str | None = None, **_: Any) -> None:
    tokens = _bound.pop(task_id or "", None)
    if tokens is not None:
        logctx.unbind(tokens)


def install() -> None:
    task_prerun.connect(_bind, weak=False)
    task_postrun.connect(_unbind, weak=False)
