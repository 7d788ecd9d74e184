"""Requests waiting on a model that is not served yet, as one gateway knows them: so the
placer can re-plan while they wait, hand them a load failure as their error, and end them
with 504 after `load_timeout` (or the model's engine's `ready_timeout`) — never a hang.

Subscriptions are held weakly (a finished request drops out by itself); a request counts as
waiting while no worker has started it, its deadline has not passed and it was not
cancelled (the client left: its cancel key is set), so no model is loaded for a request
that is gone.
"""

from __future__ import annotations

import logging
import time
import weakref

import redis.asyncio as aioredis

from common import redis_keys
from common.errors import CorralError, Timeout
from gateway.streaming.hub import Subscription

log = logging.getLogger(__name__)

Subs = weakref.WeakKeyDictionary[Subscription, float]  # -> when it started waiting (monotonic)


class Waiters:
    def __init__(self, client: aioredis.Redis, load_timeout: float) -> None:
        self._redis = client
        self.load_timeout = load_timeout
        self._subs: dict[str, Subs] = {}
        self._since: dict[str, float] = {}  # alias -> when it was first seen not ready
        self.why: dict[str, str] = {}  # alias -> why it is not placed yet (the last plan)

    def add(self, alias: str, sub: Subscription) -> None:
        self._subs.setdefault(alias, weakref.WeakKeyDictionary())[sub] = time.monotonic()

    def discard(self, alias: str, sub: Subscription) -> None:
        subs = self._subs.get(alias)
        if subs is not None:
            subs.pop(sub, None)

    def models(self) -> list[str]:
        """Models with requests not started yet (their queue may be served, or not)."""
        out = []
        for alias, subs in list(self._subs.items()):
            if not subs:
                del self._subs[alias]
            elif any(s.worker is None and not s.finished for s in list(subs)):
                out.append(alias)
        return out

    def served(self, alias: str) -> None:
        """A copy is ready: the waits for a load are over (queue waits are not ours)."""
        self._since.pop(alias, None)
        self.why.pop(alias, None)

    async def waiting(self, alias: str) -> list[tuple[Subscription, float]]:
        """(request, waited seconds) still waiting for `alias` to be loaded."""
        subs = self._subs.get(alias)
        if not subs:
            return []
        pending = [(s, t) for s, t in list(subs.items()) if s.worker is None and not s.finished]
        pipe = self._redis.pipeline(transaction=False)
        for sub, _ in pending:
            pipe.exists(redis_keys.cancel_key(sub.request_id))
        cancelled = await pipe.execute()
        now, wall = time.monotonic(), time.time()
        since = self._since.setdefault(alias, now)
        out = []
        for (sub, t), gone in zip(pending, cancelled, strict=True):
            if gone or sub.deadline <= wall:
                subs.pop(sub, None)
            else:
                out.append((sub, now - max(t, since)))
        return out

    def fail(self, alias: str, targets: list[Subscription], err: CorralError) -> None:
        log.info("model=%s %d waiting request(s) end: %s", alias, len(targets), err.message)
        subs = self._subs.get(alias, weakref.WeakKeyDictionary())
        for sub in targets:
            sub.deliver(err)
            subs.pop(sub, None)

    def expire(
        self, alias: str, waiting: list[tuple[Subscription, float]], limit: float | None = None
    ) -> None:
        """End the requests that waited longer than `limit` (default `load_timeout`) with
        a 504."""
        limit = self.load_timeout if limit is None else limit
        late = [s for s, waited in waiting if waited > limit]
        if late:
            why = f" ({self.why[alias]})" if alias in self.why else ""
            what = "load_timeout" if limit == self.load_timeout else "its engine's ready_timeout"
            self.fail(
                alias,
                late,
                Timeout(
                    f"The model {alias!r} was not loaded within {what} ({limit:.0f}s){why}.",
                    code="load_timeout",
                ),
            )
