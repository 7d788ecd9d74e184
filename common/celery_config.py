"""The Celery configuration shared by the gateway (producer) and the workers (consumers).

A plain dict, so `common` stays free of Celery itself; each side builds its own app from it.
Every value here carries one of Corral's promises (README, "How a request flows"); change
one only with its reason:
- `queue_order_strategy='sorted'`: BRPOP drains `p1-high.*` before `p2-normal.*` before
  `p3-low.*` (the default round robin interleaves them 1:1).
- late ack + prefetch 1: a worker holds at most the tasks it runs, so a high task that
  arrives while all slots are busy is the next one started.
- `visibility_timeout` >= 2 x `task_time_limit` in every process: kombu redelivers an
  unacked task after it, running or not.
- no result backend: tokens travel over pub/sub.
- a Sentinel URL (kombu reads the same `sentinel://…;sentinel://…` form) brings the
  master's name and the sentinels' options (`common.redis_conn`).
- a soft time limit below the hard one: the task cuts its stream and tells its client
  (504) before the hard limit kills its pool child, which would leave the client waiting
  in silence until its deadline.
"""

from __future__ import annotations

from typing import Any

from common.redis_conn import RedisTarget
from common.settings import Settings


def celery_config(settings: Settings, *, redis_url: str | None = None) -> dict[str, Any]:
    url = redis_url or settings.require_redis_url()
    return {
        "broker_url": url,
        "broker_transport_options": {
            "queue_order_strategy": "sorted",
            "visibility_timeout": settings.visibility_timeout,
            **RedisTarget.of(settings, url).kombu_options(),
        },
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": settings.broker_pool_limit,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": soft_time_limit(settings.task_time_limit),
        "task_create_missing_queues": True,
        # A task running when the broker goes away runs on: its own Redis client reconnects
        # (a restart, a Sentinel failover), its START is sent again until its gateway is
        # back (`workers.task.publisher`), and its claim keeps a redelivered copy from
        # running twice. Cancelled, it died with nothing said to its client, and its
        # message came back only after the visibility timeout.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_disable_rate_limits": True,
    }


def soft_time_limit(hard: float) -> float:
    """A task's soft time limit: 10 s (half, for limits under 20 s) before the hard one,
    time enough for the task to end its stream and for Celery to hear of it."""
    return hard - min(10.0, hard / 2)
