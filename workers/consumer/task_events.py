"""Celery's task events (`task-received`, `-started`, `-succeeded` …) only while a Flower
asks for them.

Building and publishing those events is a large share of a worker's main-process CPU
per request, spent whether or not anyone listened. So a worker starts without them
(`worker_send_task_events` off; its heartbeats still go out, so Flower lists it) and
sends them for `LEASE_S` after each `enable_events` broadcast. Flower sends one every 5 s
while it runs (`corral flower` also sends one as it starts), so its task views stay
complete; once Flower is gone the events stop again within `LEASE_S`. Celery's own
`enable_events` makes them permanent instead; this module's one replaces it in the
worker's control panel.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps
from celery.worker.control import control_command, ok

log = logging.getLogger(__name__)

LEASE_S = 20.0  # four of Flower's 5 s `enable_events` rounds
CHECK_S = 2.0  # how often a worker looks whether its lease ran out

TASK = "task"  # Celery's event group of the task events


class Lease:
    """Until when task events are wanted. One per worker process (the consumer's)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._until = float("-inf")

    def renew(self) -> None:
        self._until = self._clock() + LEASE_S

    def held(self) -> bool:
        return self._clock() < self._until


lease = Lease()


def _groups(consumer: Any) -> set[str] | None:
    """The event groups the consumer's dispatcher sends (None: no dispatcher yet)."""
    dispatcher = consumer.event_dispatcher if consumer is not None else None
    return None if dispatcher is None else dispatcher.groups


def sync(consumer: Any) -> None:
    """Task events on while the lease holds, off once it ran out. Also after a broker
    reconnect, whose new dispatcher starts without them."""
    groups = _groups(consumer)
    if groups is None:
        return
    if lease.held() and TASK not in groups:
        groups.add(TASK)
        log.info("task events on: a Flower asked for them")
    elif not lease.held() and TASK in groups:
        groups.discard(TASK)
        log.info("task events off: no Flower asked for them for %.0f s", LEASE_S)


@control_command()  # replaces Celery's `enable_events`
def enable_events(state: Any) -> dict[str, str]:
    """Send task events for the next `LEASE_S` seconds (Flower renews it every 5 s)."""
    lease.renew()
    sync(state.consumer)
    return ok("task events enabled")


class ExpireTaskEvents(bootsteps.StartStopStep):
    """Checks the lease every `CHECK_S` on the consumer's own timer."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entry: Any = None

    def start(self, parent: Any) -> None:
        self._entry = parent.timer.call_repeatedly(CHECK_S, sync, (parent,), priority=10)

    def stop(self, parent: Any) -> None:
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
