"""When to restart a crashed engine child (llama-server or another), and when to give up.

Exponential backoff (1 s, 2 s, 4 s ... capped) between restarts; the third crash within
five minutes marks the model `failed` on that worker, so a model that cannot run stops
burning a worker and its requests go to other replicas (or get a clear 503) until
`POST /v1/models/{alias}/reset`. A failure list that only grows is what RouterModelCustom
users complain about; here a crash older than the window is forgotten.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from threading import Event
from typing import TYPE_CHECKING

from common import redis_keys
from common.errors import LlamaServerError, QueueError
from common.registry import ModelState, WorkerState
from workers.models import affinity

if TYPE_CHECKING:
    from workers.models.lifecycle import Held, ModelHost

log = logging.getLogger(__name__)


class CrashHistory:
    def __init__(
        self, limit: int = 3, window: float = 300.0, base: float = 1.0, cap: float = 30.0
    ) -> None:
        self.limit = limit
        self.window = window
        self.base = base
        self.cap = cap
        self._crashes: deque[float] = deque()

    def record(self, now: float) -> float | None:
        """Note a crash at `now`: the delay before restarting, or None to give up."""
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        if len(self._crashes) >= self.limit:
            return None
        return min(self.base * 2 ** (len(self._crashes) - 1), self.cap)

    def reset(self) -> None:
        self._crashes.clear()

    @property
    def recent(self) -> int:
        return len(self._crashes)


def restart_after_crash(host: ModelHost, held: Held, crashes: CrashHistory, stop: Event) -> None:
    """The held model's engine child died: stop consuming its queues (replicas take the
    work), restart it with backoff on the same port, or give up and mark it failed here."""
    wid, alias = host.spec.worker_id, held.alias
    host.parts.serving.set(None)
    try:
        host.parts.queues.stop_consuming(redis_keys.consumed_queues(alias, wid))
    except QueueError as exc:
        log.error("worker=%s model=%s %s", wid, alias, exc)
    affinity.give_back(host.parts.redis, alias, wid)
    while True:
        rc, tail = held.server.returncode, held.server.last_log_lines(3)
        held.server.stop()
        delay = crashes.record(time.monotonic())
        log.warning(
            "worker=%s model=%s %s crashed rc=%s (%d recent); %s",
            wid,
            alias,
            held.server.name,
            rc,
            crashes.recent,
            "giving up" if delay is None else f"restart in {delay:.0f}s",
        )
        if delay is None:
            why = f"{held.server.name} crashed {crashes.limit} times within {crashes.window:.0f}s"
            host.fail(alias, why, f"{why} (last rc={rc}): " + " | ".join(tail))
            return
        held.restarts += 1
        host.parts.report.transition(WorkerState.LOADING, upstream=None, restarts=held.restarts)
        host.parts.report.event(alias, ModelState.LOADING)
        if stop.wait(delay):
            return
        try:
            held.server.start()
            held.server.ensure_ready(host.ready_timeout(held.config))
            break
        except LlamaServerError as exc:
            log.warning("worker=%s model=%s restart failed: %s", wid, alias, exc)
    held.loaded_at = time.time()
    host.go_ready(held, consume=True, used_mb=None)
