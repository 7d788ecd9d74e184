"""When to restart a crashed llama-server, and when to give up.

Exponential backoff (1 s, 2 s, 4 s ... capped) between restarts; the third crash within
five minutes marks the model `failed` on that worker, so a model that cannot run stops
burning a worker and its requests go to other replicas (or get a clear 503) until
`POST /v1/models/{alias}/reset`. A failure list that only grows is what RouterModelCustom
users complain about; here a crash older than the window is forgotten.
"""

from __future__ import annotations

from collections import deque


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
