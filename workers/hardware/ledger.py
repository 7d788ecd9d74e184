"""A worker's side of its device's memory ledger (`common.devices`): it announces the
device's budget as it sees it (with each heartbeat), reserves what its model needs before
loading it, waiting a while for room others are freeing (an eviction under way), and
releases it when the model goes.

The model manager's thread is the only caller of `reserve` and `release`: what this worker
holds is `held_mb`, written only there."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from common import redis_keys
from common.devices import BUDGET, RESERVE_LUA, RESERVED

log = logging.getLogger(__name__)

ROOM_POLL_S = 0.05


@dataclass(frozen=True)
class Answer:
    reserved: bool
    budget_mb: int | None
    others_mb: int  # reserved by the other live workers of the device

    @property
    def free_mb(self) -> int | None:
        return None if self.budget_mb is None else self.budget_mb - self.others_mb


class DeviceLedger:
    def __init__(self, client: redis.Redis, device: str, worker_id: str, budget_mb: int) -> None:
        self.device = device
        self.worker_id = worker_id
        self.budget_mb = budget_mb
        self.held_mb: int | None = None
        self._redis = client
        self._key = redis_keys.device_key(device)
        self._script = client.register_script(RESERVE_LUA)

    def announce(self, pipe: redis.client.Pipeline) -> None:
        """Add this worker's budget to `pipe` (a heartbeat's round trip)."""
        pipe.hset(self._key, BUDGET + self.worker_id, self.budget_mb)

    def room(self) -> Answer:
        """The device's room now, without reserving anything."""
        return self._ask(0)

    def reserve(self, mb: int) -> Answer:
        """Hold `mb` for this worker's model (replacing what it held), if the device has room."""
        answer = self._ask(mb)
        if answer.reserved:
            self.held_mb = mb
        return answer

    def wait_for_room(self, mb: int, timeout: float, stop: threading.Event) -> Answer:
        """`reserve(mb)`, retried while other workers of the device free memory (models
        being evicted for this one), for `timeout` seconds at most."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.reserve(mb)
            if answer.reserved or time.monotonic() >= deadline or stop.is_set():
                return answer
            stop.wait(ROOM_POLL_S)

    def release(self) -> None:
        if self.held_mb is None:
            return
        self.held_mb = None
        try:
            self._redis.hdel(self._key, RESERVED + self.worker_id)
        except redis.RedisError as exc:  # dropped with this worker's entry if it dies
            log.warning("worker=%s could not release its memory: %r", self.worker_id, exc)

    def leave(self) -> None:
        """Drop this worker's fields (a clean stop)."""
        self.held_mb = None
        try:
            self._redis.hdel(self._key, BUDGET + self.worker_id, RESERVED + self.worker_id)
        except redis.RedisError as exc:
            log.warning("worker=%s could not leave its device's ledger: %r", self.worker_id, exc)

    def _ask(self, mb: int) -> Answer:
        prefix = redis_keys.worker_key("")
        ok, budget, others = self._script(keys=[self._key], args=[self.worker_id, mb, prefix])
        budget_mb = None if int(budget) < 0 else int(budget)
        return Answer(bool(int(ok)) and mb > 0, budget_mb, int(others))
