"""What a worker's task code needs at run time: its id, model, llama-server URL, clients.

Set once by the worker's main process before Celery forks its pool (`configure`), so every
pool child inherits it. Network clients are created lazily per process: a Redis or HTTP
connection opened before a fork must never be shared with the child.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import redis

from common.settings import Settings
from workers.upstream import Upstream


@dataclass
class Runtime:
    settings: Settings
    redis_url: str
    worker_id: str
    alias: str
    upstream_url: str
    _pid: int = field(default=-1, repr=False)
    _redis: redis.Redis | None = field(default=None, repr=False)
    _upstream: Upstream | None = field(default=None, repr=False)

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._redis = None
            self._upstream = None

    @property
    def redis(self) -> redis.Redis:
        self._check_pid()
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, health_check_interval=30)
        return self._redis

    @property
    def upstream(self) -> Upstream:
        self._check_pid()
        if self._upstream is None:
            self._upstream = Upstream(self.upstream_url, self.settings.task_time_limit)
        return self._upstream


_runtime: Runtime | None = None


def configure(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker runtime not configured: start workers with `corral worker`")
    return _runtime
