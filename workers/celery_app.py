"""The workers' Celery app. Built without configuration at import (tasks register on it);
`configure_app(settings)` applies the shared config from `common.celery_config` at boot."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init

from common.celery_config import celery_config
from common.settings import Settings

app = Celery("corral", include=["workers.tasks"])


@worker_process_init.connect
def _yield_to_the_consumer(**_: object) -> None:
    """Pool children relay streams; the worker's main process fetches the next task. With
    many runnable processes on few cores, a fetch stuck behind the streams leaves slots
    idle while tasks wait in Redis (measured: c=32 TTFT p50 1.3 s → 0.6 s with this)."""
    os.nice(5)


def configure_app(settings: Settings, redis_url: str) -> Celery:
    app.conf.update(celery_config(settings, redis_url=redis_url))
    return app
