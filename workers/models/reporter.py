"""How the model manager tells the cluster what it does: its registry entry (through the
heartbeat), a `ModelEvent` on `redis_keys.EVENTS` per model state change (the gateway's status
stream relays them), and the release of the placement lock once a load is visible.

Redis trouble here is logged, never raised: the manager's state is its own, and the
heartbeat carries it again a second later.
"""

from __future__ import annotations

import logging

import redis

from common import redis_keys
from common.locks import RELEASE_LUA
from common.registry import ModelEvent, ModelState, WorkerState
from workers.models.heartbeat import Heartbeat

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, client: redis.Redis, hb: Heartbeat) -> None:
        self._redis = client
        self._hb = hb
        self.worker_id = hb.info.id

    def transition(self, state: WorkerState, **changes: object) -> None:
        """Rewrite the registry entry now (not at the next beat)."""
        try:
            self._hb.update(state=state, **changes)
        except redis.RedisError as exc:
            log.warning("worker=%s registry update failed: %r", self.worker_id, exc)

    def event(self, alias: str, state: ModelState, error: str | None = None) -> None:
        ev = ModelEvent(model=alias, worker=self.worker_id, state=state, error=error)
        log.info(
            "worker=%s model=%s event=%s%s",
            self.worker_id,
            alias,
            state.value,
            f" error={error.splitlines()[0]!r}" if error else "",
        )
        try:
            self._redis.publish(redis_keys.EVENTS, ev.model_dump_json())
        except redis.RedisError as exc:
            log.warning("worker=%s could not publish %s: %r", self.worker_id, ev, exc)

    def release(self, alias: str, token: str | None) -> None:
        """Free `alias`'s placement lock if `token` still holds it."""
        if not token:
            return
        try:
            self._redis.eval(RELEASE_LUA, 1, redis_keys.placement_lock(alias), token)
        except redis.RedisError as exc:
            log.warning(
                "worker=%s could not release the lock of %s: %r", self.worker_id, alias, exc
            )
