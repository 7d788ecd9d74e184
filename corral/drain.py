"""`corral drain`: the workers on this host stop taking tasks, then it waits until they have
finished the ones they hold. A Kubernetes preStop hook for worker pods: the SIGTERM that
follows then ends an idle worker at once, and nothing a client waits on is cut.

Through Celery's remote control, as a worker changes its own queues
(`workers.consumer.queues`): `cancel_consumer` for each queue a worker consumes, verified
with `active_queues` (the command is at-most-once and bites within a BRPOP cycle), then
`active` and `reserved` polled until both are empty. A worker's Celery name ends in
`@<host name>` (`workers.main.new_worker_id`), which is how it is found here: in a pod,
the host name is the pod's. Tasks still queued stay in Redis for the other workers.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Celery

from common.celery_config import celery_config
from common.settings import Settings

log = logging.getLogger(__name__)

INSPECT_TIMEOUT_S = 2.0
POLL_S = 1.0
VERIFY_ATTEMPTS = 5


class Drain:
    def __init__(self, settings: Settings, host: str | None = None) -> None:
        self._app = Celery("corral-drain", set_as_current=False)
        self._app.conf.update(celery_config(settings))
        self.host = host or socket.gethostname()

    def close(self) -> None:
        self._app.close()

    def workers(self) -> list[str]:
        """The Celery names of the live workers on this host."""
        replies = self._inspect().ping() or {}
        return sorted(name for name in replies if name.endswith(f"@{self.host}"))

    def stop_consuming(self, workers: list[str]) -> bool:
        """Cancel every queue `workers` consume; True once none consumes any."""
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            consumed = self._queues(workers)
            if not any(consumed.values()):
                return True
            for worker, queues in consumed.items():
                for queue in sorted(queues):
                    self._app.control.cancel_consumer(
                        queue, destination=[worker], reply=True, timeout=INSPECT_TIMEOUT_S
                    )
            log.info("drain attempt=%d cancelled %s", attempt, _show(consumed))
            time.sleep(0.2 * attempt)
        return not any(self._queues(workers).values())

    def busy(self, workers: list[str]) -> int:
        """Tasks `workers` run or hold (reserved, not started yet)."""
        inspect = self._inspect(workers)
        held = 0
        for replies in (inspect.active() or {}, inspect.reserved() or {}):
            held += sum(len(tasks) for tasks in replies.values())
            held += len(set(workers) - set(replies))  # no answer: not known to be idle
        return held

    def _queues(self, workers: list[str]) -> dict[str, set[str]]:
        replies = self._inspect(workers).active_queues() or {}
        return {w: {q["name"] for q in replies.get(w, [])} for w in workers}

    def _inspect(self, workers: list[str] | None = None) -> Any:
        return self._app.control.inspect(destination=workers, timeout=INSPECT_TIMEOUT_S)


def run_drain(settings: Settings, timeout: float) -> int:
    """Drain this host's workers within `timeout` seconds: 0 if done, 1 if not."""
    drain = Drain(settings)
    try:
        workers = drain.workers()
        if not workers:
            print(f"corral drain: no worker on {drain.host}")
            return 0
        deadline = time.monotonic() + timeout
        if not drain.stop_consuming(workers):
            print(f"corral drain: {', '.join(workers)} still consume; waiting anyway")
        print(f"corral drain: {', '.join(workers)} take no new tasks", flush=True)
        while (held := drain.busy(workers)) > 0:
            if time.monotonic() > deadline:
                print(f"corral drain: {held} task(s) still running after {timeout:g} s")
                return 1
            time.sleep(POLL_S)
        print(f"corral drain: {', '.join(workers)} idle")
        return 0
    finally:
        drain.close()


def _show(consumed: dict[str, set[str]]) -> str:
    return "; ".join(f"{w}: {','.join(sorted(q))}" for w, q in consumed.items() if q)
