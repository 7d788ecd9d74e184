"""The worker's main process, as Celery runs it: the Celery app and its consumer
(`celery_app`), the broker transport (`broker`), which queues it consumes (`queues`), and
what happens when a pool child dies mid-task (`child_lost`)."""

from __future__ import annotations

from workers.consumer.celery_app import configure_app
from workers.consumer.queues import QueueControl

__all__ = ["QueueControl", "configure_app"]
