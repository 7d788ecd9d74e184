"""The worker's Celery consumer, seen from its model manager: which queues it consumes, and
what its pool is doing.

A worker that loads a model starts consuming that model's queues itself, with remote
control commands addressed to its own hostname (`add_consumer` / `cancel_consumer`, run on
the consumer's own thread, so nothing here touches kombu's event loop from another thread),
then checks with `inspect().active_queues()`: these commands are
at-most-once and take about a second to bite (the BRPOP in flight still names the old
queues). So every change is verified and retried, and the task itself refuses a model the
worker no longer serves (`runtime.Serving`).

What the pool runs is read from Celery's own bookkeeping in this (main) process
(`celery.worker.state`): it survives pool children being killed, and costs no Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from common import redis_keys
from common.errors import QueueError
from workers.consumer.broker import LISTENING

log = logging.getLogger(__name__)

BRPOP_CYCLE_S = 1.2  # kombu's BRPOP timeout (1 s) + margin: when a cancelled queue is gone
LISTEN_WAIT_S = 3.0  # for the consumer's next BRPOP to name a changed set of queues
VERIFY_ATTEMPTS = 5


class QueueControl:
    def __init__(self, app: Celery, hostname: str, initial: list[str]) -> None:
        self._app = app
        self._hostname = hostname
        self.queues: set[str] = set(initial)  # what we asked for; verified after each change
        self._ready = threading.Event()
        self._last_received = 0.0
        self._confirmed = False  # the last change was seen in the consumer's own BRPOP
        worker_ready.connect(self._on_ready, weak=False)
        task_received.connect(self._on_received, weak=False)

    # -- what the pool does --------------------------------------------------------------
    def running(self) -> int:
        """Tasks running in the pool now (slots busy)."""
        return len(worker_state.active_requests)

    def reserved(self) -> int:
        """Tasks this worker took from the broker and has not finished (running or not)."""
        return len(worker_state.reserved_requests)

    def last_received(self) -> float:
        """Epoch time the last task arrived (0: none yet)."""
        return self._last_received

    # -- consuming -----------------------------------------------------------------------
    def consume(self, queues: list[str]) -> None:
        """Start consuming `queues` (verified)."""
        self._change(add=queues, remove=[])

    def stop_consuming(self, queues: list[str]) -> None:
        """Stop consuming `queues` (verified); a BRPOP already in flight may still deliver
        one task from them, which the task sends back (`runtime.Serving`)."""
        self._change(add=[], remove=queues)

    def drain(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until no task is reserved: True if drained. A BRPOP already in flight may
        still deliver one task from the queues just left; once the consumer's next BRPOP
        was seen (`broker.LISTENING`) none is in flight, else a whole cycle is waited."""
        if not self._confirmed:
            time.sleep(BRPOP_CYCLE_S)
        deadline = time.monotonic() + timeout
        while self.reserved() > 0:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.05)
        return True

    def _change(self, add: list[str], remove: list[str]) -> None:
        if not self._ready.wait(60):
            raise QueueError("the Celery consumer did not start within 60 s")
        want = (self.queues | set(add)) - set(remove)
        self._confirmed = False
        if LISTENING.active and self._listened(want, add, remove):
            return
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            try:
                got = self._apply(want, remove)
            except (OperationalError, RedisError, OSError) as exc:  # the broker, a moment
                log.warning(
                    "worker=%s queue change failed (attempt %d): %r", self._hostname, attempt, exc
                )
            else:
                if all(q in got for q in add) and not any(q in got for q in remove):
                    self.queues = want
                    log.info("worker=%s queues=%s", self._hostname, ",".join(sorted(got)))
                    return
                log.warning(
                    "worker=%s queue change not seen yet (attempt %d): want +%s -%s, have %s",
                    self._hostname,
                    attempt,
                    add,
                    remove,
                    sorted(got),
                )
            time.sleep(0.2 * attempt)
        # Always a QueueError, whatever failed: the callers unload or retry on it, and any
        # other error left the worker LOADING with nobody consuming its model's queues.
        raise QueueError(f"could not change the consumed queues (+{add} -{remove})")

    def _listened(self, want: set[str], add: list[str], remove: list[str]) -> bool:
        """The change, sent without waiting for replies and confirmed by the consumer's own
        next BRPOP (no `inspect` round trips, and it is then truly listening); False if
        that was not seen in time (the caller then goes the verified way)."""
        control = self._app.control
        try:
            for q in sorted(set(add) - self.queues):
                control.add_consumer(q, destination=[self._hostname], reply=False)
            for q in sorted(set(remove) & self.queues):
                control.cancel_consumer(q, destination=[self._hostname], reply=False)
        except (OperationalError, RedisError, OSError) as exc:
            log.warning("worker=%s queue change failed: %r", self._hostname, exc)
            return False
        anchor = redis_keys.worker_queue(self._hostname)
        if not LISTENING.wait(anchor, set(add), set(remove), LISTEN_WAIT_S):
            log.warning(
                "worker=%s queue change not heard in a BRPOP: +%s -%s", self._hostname, add, remove
            )
            return False
        self.queues = want
        self._confirmed = True
        log.info("worker=%s queues=%s", self._hostname, ",".join(sorted(want)))
        return True

    def _apply(self, want: set[str], remove: list[str]) -> set[str]:
        """Ask for the changes the consumer lacks; the queues it consumes afterwards."""
        control = self._app.control
        active = self._active()
        for q in sorted(want - active):
            control.add_consumer(q, destination=[self._hostname], reply=True, timeout=2, limit=1)
        for q in sorted(active & set(remove)):
            control.cancel_consumer(q, destination=[self._hostname], reply=True, timeout=2, limit=1)
        return self._active()

    def _active(self) -> set[str]:
        reply: dict[str, Any] | None = self._app.control.inspect(
            destination=[self._hostname], timeout=2, limit=1
        ).active_queues()
        return {q["name"] for q in (reply or {}).get(self._hostname, [])}

    def _on_ready(self, sender: Any = None, **_: Any) -> None:
        self._ready.set()

    def _on_received(self, sender: Any = None, **_: Any) -> None:
        self._last_received = time.time()
