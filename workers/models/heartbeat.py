"""The worker's registry entry in Redis, rewritten every `heartbeat_interval` with a TTL.

The key expiring *is* the death notice: a gateway waiting on a stream from this worker
fails it within seconds, and a restarted cluster finds no stale workers.

Lifecycle fields (state, model...) change only through `update()`, called by the model
manager; fast-moving ones (slots busy, memory used, last use) are read by `sample` at
each beat, so the entry is never more than one interval old.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from common import redis_keys
from common.registry import WorkerInfo

log = logging.getLogger(__name__)


class Heartbeat:
    """Owns the registry entry: `update()` changes it, the thread keeps it alive."""

    def __init__(
        self,
        client: redis.Redis,
        info: WorkerInfo,
        interval: float,
        ttl: float,
        sample: Callable[[], dict[str, object]] | None = None,
        also: Callable[[redis.client.Pipeline], None] | None = None,
    ):
        self._redis = client
        self._info = info
        self._sample = sample
        self._also = also  # more writes for each beat's round trip (the device ledger's)
        self._interval = interval
        self._ttl_ms = int(ttl * 1000)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-heartbeat", daemon=True)

    @property
    def info(self) -> WorkerInfo:
        with self._lock:
            return self._info.model_copy()

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def update(self, **changes: object) -> None:
        with self._lock:
            self._info = self._info.model_copy(update=changes)
        self._beat()
        log.info(
            "worker=%s state=%s model=%s", self._info.id, self._info.state.value, self._info.model
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(redis_keys.worker_key(self._info.id))
            pipe.srem(redis_keys.WORKERS, self._info.id)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("worker=%s could not remove its registry entry: %r", self._info.id, exc)

    def _beat(self) -> None:
        with self._lock:
            payload = self._info.model_dump_json()
            worker_id, held = self._info.id, self._info.model
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(redis_keys.worker_key(worker_id), payload, px=self._ttl_ms)
        pipe.sadd(redis_keys.WORKERS, worker_id)
        if held:  # its catalog entry outlives a missed beat (a broker restart) by a grace
            pipe.zadd(redis_keys.CATALOG_SEEN, {held: time.time()})
        if self._also is not None:
            self._also(pipe)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take_sample()
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("worker=%s heartbeat failed: %r", self._info.id, exc)

    def _take_sample(self) -> None:
        if self._sample is None:
            return
        try:
            changes = self._sample()
        except Exception:  # a failed sample must never stop the heartbeat
            log.exception("worker=%s heartbeat sample failed", self._info.id)
            return
        with self._lock:
            self._info = self._info.model_copy(update=changes)
