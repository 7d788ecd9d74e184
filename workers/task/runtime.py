"""What a worker's task code needs at run time: its id, llama-server URL, clients, and the
model it serves right now.

Set once by the worker's main process before Celery forks its pool (`configure`), so every
pool child inherits it. Network clients are created lazily per process: a Redis or HTTP
connection opened before a fork must never be shared with the child.

The model changes over the worker's life while the pool children live on, so
it sits in a `Serving` cell of shared memory that the main process's model manager writes
and the children read before each task. The llama-server port is fixed for the worker's
life, so the upstream URL the children inherited stays right across model swaps.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field

import redis
from celery.exceptions import Reject

from common.engines import LLAMA_SERVER
from common.redis_conn import RedisTarget
from common.settings import Settings
from workers.task.upstream import Upstream

log = logging.getLogger(__name__)

REQUEUE_PAUSE_S = 0.05  # a worker still fetching a queue it just left does not spin


class Serving:
    """The alias this worker serves now (None: none), shared with the pool children.

    Created before the pool forks; the model manager sets it once llama-server is ready and
    clears it before unloading, so a task for any other model is sent back to its queue."""

    SIZE = 512

    def __init__(self) -> None:
        # No lock shared with the children: one killed while holding it (the OOM killer
        # picks pool children) would freeze every reader and the model manager. The main
        # process writes (under a lock of its own), the children read, and a sequence
        # number, odd while a write is under way, tells a reader to read again.
        ctx = multiprocessing.get_context("fork")
        self._cell = ctx.RawArray(ctypes.c_char, self.SIZE)
        self._seq = ctx.RawValue(ctypes.c_uint64, 0)
        self._write = threading.Lock()

    def set(self, alias: str | None) -> None:
        raw = (alias or "").encode()
        if len(raw) >= self.SIZE:
            raise ValueError(f"model alias too long for the serving cell: {alias!r}")
        with self._write:
            self._seq.value += 1
            self._cell.value = raw
            self._seq.value += 1

    def wait_not(self, alias: str, timeout: float) -> bool:
        """Until this worker no longer serves `alias` (its manager saw its child die);
        False if it still does after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.get() == alias:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def get(self) -> str | None:
        while True:
            before = self._seq.value
            raw = bytes(self._cell.value)
            if before % 2 == 0 and self._seq.value == before:
                return raw.decode() or None


@dataclass
class Runtime:
    settings: Settings
    redis_url: str
    worker_id: str
    upstream_url: str
    serving: Serving = field(default_factory=Serving)
    _pid: int = field(default=-1, repr=False)
    _redis: redis.Redis | None = field(default=None, repr=False)
    _upstreams: dict[str, Upstream] = field(default_factory=dict, repr=False)  # by engine

    def require_serving(self, alias: str) -> None:
        """Send the task back to its queue unless this worker serves `alias` right now.

        A worker stops consuming a model's queues before it unloads it, but the BRPOP in
        flight may still hand it one task: `cancel_consumer` bites only at the next BRPOP.
        Rejected before the claim, so another worker runs it as if it never came here."""
        held = self.serving.get()
        if held == alias:
            return
        log.info(
            "model=%s sent back to its queue: worker=%s serves %s", alias, self.worker_id, held
        )
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(f"worker {self.worker_id} does not serve {alias} now", requeue=True)

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._redis = None
            self._upstreams = {}

    @property
    def redis(self) -> redis.Redis:
        self._check_pid()
        if self._redis is None:
            target = RedisTarget.of(self.settings, self.redis_url)
            self._redis = target.client(health_check_interval=30)
        return self._redis

    def upstream(self, alias: str) -> Upstream:
        """The client of the local engine serving `alias`, named for that engine in its
        errors (a worker may serve models of several engines in turn)."""
        self._check_pid()
        model = self.settings.models.get(alias)
        custom = model.custom_engine if model is not None else None
        engine = custom.program if custom is not None else LLAMA_SERVER
        found = self._upstreams.get(engine)
        if found is None:
            found = Upstream(self.upstream_url, self.settings.task_time_limit, engine)
            self._upstreams[engine] = found
        return found


_runtime: Runtime | None = None


def configure(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker runtime not configured: start workers with `corral worker`")
    return _runtime
