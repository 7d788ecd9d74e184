"""The workers' Celery app. Built without configuration at import (tasks register on it);
`configure_app(settings)` applies the shared config from `common.celery_config` at boot."""

from __future__ import annotations

import functools
import gc
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready
from celery.worker.consumer import Consumer as CeleryConsumer

from common.celery_config import celery_config
from common.redis_conn import is_sentinel_url
from common.settings import Settings

app = Celery("corral", include=["workers.task.infer"])


# How long task events wait in Celery's buffer before one PUBLISH sends them (see Consumer).
EVENT_FLUSH_DELAY_S = 0.005
# Pauses between attempts to reach the broker again (see Consumer.ensure_connected).
RECONNECT_START_S = 0.5
RECONNECT_STEP_S = 0.5
RECONNECT_MAX_S = 2.0


class Consumer(CeleryConsumer):
    """Celery's consumer, with its task events sent a few milliseconds later (and sooner
    attempts to reach a broker it lost, `ensure_connected`).

    Celery buffers task events (`task-received`, `task-succeeded` …) and flushes them on
    the event loop's next turn, with a blocking PUBLISH. That turn is the
    worst one to block: it is the one in which the pool writes a new task to a child (the
    task's first token waited for it), and the one in which the consumer, a task having
    just ended, acks and fetches the next task (the hand-off between two tasks waited for
    it, once for the ended task's events and once for the new one's). A timer sends the
    same events, in the same order, `EVENT_FLUSH_DELAY_S` later, off both paths; Flower
    sees them that much later. (`worker_consumer` names this class.)"""

    _flush_timer: Any = None  # the pending flush (a kombu timer entry), if any

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        pending = self._flush_timer
        if pending is None or pending.canceled:  # a reconnect cancels the consumer's timers
            self._flush_timer = self.hub.call_later(EVENT_FLUSH_DELAY_S, self._flush_buffered)

    def _flush_buffered(self) -> None:
        self._flush_timer = None
        self._flush_events()

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's, with shorter pauses between attempts: kombu waits 2 s, 4 s, … up to
        30 s between rounds, so a worker that lost its broker (a Redis restart, a Sentinel
        failover that took a few seconds) went on waiting up to half a minute after the
        broker was back. Here it tries again every 0.5 s, then every 2 s at most."""
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_START_S,
            interval_step=RECONNECT_STEP_S,
            interval_max=RECONNECT_MAX_S,
        )
        return super().ensure_connected(conn)


@worker_process_init.connect
def _yield_to_the_consumer(**_: object) -> None:
    """Pool children relay streams; the worker's main process fetches the next task. With
    many runnable processes on few cores, a fetch stuck behind the streams leaves slots
    idle while tasks wait in Redis (the c=32 figures are in `benchmarks/README.md`).
    The heap a child inherits is frozen (see `_freeze_the_heap`)."""
    os.nice(5)
    gc.freeze()


@worker_ready.connect
def _freeze_the_heap(**_: object) -> None:
    """Exempt everything built at startup (Celery, kombu, pydantic's schemas: hundreds of
    thousands of objects) from the garbage collector's full passes. Each pass walked all of
    them, and meanwhile the consumer neither fetched nor handed over a task."""
    gc.freeze()


# How long an idle consumer's BRPOP waits before the next (kombu's default: 1 s). A queue
# the worker starts consuming (a model it just loaded) is heard only by the next BRPOP, so
# this bounds how long a loaded model waits for its first task; idle, it costs a few cheap
# round trips a second.
BRPOP_TIMEOUT_S = 0.05


def configure_app(settings: Settings, redis_url: str) -> Celery:
    app.conf.update(celery_config(settings, redis_url=redis_url))
    options = dict(app.conf.broker_transport_options)
    app.conf.broker_transport_options = {**options, "polling_interval": BRPOP_TIMEOUT_S}
    app.conf.worker_consumer = f"{__name__}:Consumer"
    # Acks written unblocked (`workers.consumer.broker`); TLS URLs keep kombu's own transport.
    if redis_url.startswith("redis://"):
        app.conf.broker_transport = "workers.consumer.broker:Transport"
    elif is_sentinel_url(redis_url):
        app.conf.broker_transport = "workers.consumer.broker:SentinelTransport"
    return app
