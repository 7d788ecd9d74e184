"""A worker stopping (SIGTERM, Ctrl-C): it takes no new task, lets the running ones finish
for `drain_timeout` seconds, then gives those left up, and only then stops its llama-server.

Celery's warm shutdown stops consuming at once and waits for the pool, without a limit. On
its `worker_shutting_down` signal the model manager is told to stop serving (a task that
arrives now goes back to its queue, for another worker) and to say `stopping` in the
registry, so no placement picks this worker. Once the time is up, the tasks still running
are given up through their cancel keys, marked `drain`: a whole reply runs once more on
another worker (the gateway queues it again, as after a lost worker), a stream's client is
told the worker stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import worker_shutting_down
from celery.worker import state as worker_state

from common import redis_keys

log = logging.getLogger(__name__)

DRAIN = "drain"  # a cancel key's value: given up by a stopping worker, not by its client
GIVE_UP_WAIT_S = 5.0  # for the given-up tasks to end, before the pool is left to Celery


class Drain:
    def __init__(
        self, client: redis.Redis, worker_id: str, timeout: float, stop_serving: Callable[[], None]
    ) -> None:
        self._redis = client
        self._worker_id = worker_id
        self._timeout = timeout
        self._stop_serving = stop_serving
        self._started = threading.Event()
        worker_shutting_down.connect(self._on_shutdown, weak=False)

    def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """Celery's signal handler context: start the drain's thread and return."""
        if self._started.is_set():
            return
        self._started.set()
        threading.Thread(target=self._run, name="corral-drain", daemon=True).start()

    def _run(self) -> None:
        self._stop_serving()
        deadline = time.monotonic() + self._timeout
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = running()
        if not left:
            log.info("worker=%s drained", self._worker_id)
            return
        log.warning(
            "worker=%s drain_timeout (%.0f s): giving up %d running request(s)",
            self._worker_id,
            self._timeout,
            len(left),
        )
        try:
            pipe = self._redis.pipeline(transaction=False)
            for request_id in left:
                pipe.set(redis_keys.cancel_key(request_id), DRAIN, ex=60)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("worker=%s could not give its requests up: %r", self._worker_id, exc)
        end = time.monotonic() + GIVE_UP_WAIT_S
        while running() and time.monotonic() < end:
            time.sleep(0.05)


def running() -> list[str]:
    """The request ids of the tasks running in this worker's pool (Celery's own count)."""
    return [str(r.id) for r in list(worker_state.active_requests)]
