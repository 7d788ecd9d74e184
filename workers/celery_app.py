"""The workers' Celery app. Built without configuration at import (tasks register on it);
`configure_app(settings)` applies the shared config from `common.celery_config` at boot."""

from __future__ import annotations

from celery import Celery

from common.celery_config import celery_config
from common.settings import Settings

app = Celery("corral", include=["workers.tasks"])


def configure_app(settings: Settings, redis_url: str) -> Celery:
    app.conf.update(celery_config(settings, redis_url=redis_url))
    return app
