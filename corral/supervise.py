"""`corral up` keeps its children running: a worker that dies (killed, out of memory, a
crash) is started again with backoff, and so is the gateway; only a child marked essential
that keeps failing (the gateway, `GIVE_UP` exits within `WINDOW_S`) stops the run. Each exit
and restart is one log line.

The supervisor runs in `corral up`'s main thread (its children's PR_SET_PDEATHSIG is tied
to the thread that spawned them) and is polled (`check`); it owns the children's restart
state.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from corral.procs import Child

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
WINDOW_S = 60.0  # exits counted toward giving up, and a run this long resets the backoff
GIVE_UP = 5


@dataclass
class Supervised:
    child: Child
    essential: bool = False  # its failing for good stops the run
    exits: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # waiting out its backoff until then
    delay: float = FIRST_DELAY_S
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, children: list[Supervised]) -> None:
        self.children = children

    def check(self, now: float | None = None) -> str | None:
        """Restart what is due, note what exited; a reason to stop the run, or None."""
        now = time.monotonic() if now is None else now
        for s in self.children:
            if s.restart_at is not None:
                if now >= s.restart_at:
                    self._restart(s, now)
                continue
            rc = s.child.poll()
            if rc is not None:
                reason = self._exited(s, rc, now)
                if reason:
                    return reason
        return None

    def _exited(self, s: Supervised, rc: int, now: float) -> str | None:
        if now - s.started_at > WINDOW_S:
            s.delay = FIRST_DELAY_S  # it ran a good while: this is a new incident
        s.exits.append(now)
        while s.exits and now - s.exits[0] > WINDOW_S:
            s.exits.popleft()
        if s.essential and len(s.exits) >= GIVE_UP:
            return f"{s.child.name} exited {len(s.exits)} times within {WINDOW_S:.0f}s (rc={rc})"
        log.warning("%s exited (rc=%s); starting it again in %.0fs", s.child.name, rc, s.delay)
        s.restart_at = now + s.delay
        s.delay = min(s.delay * 2, MAX_DELAY_S)
        return None

    def _restart(self, s: Supervised, now: float) -> None:
        s.restart_at = None
        s.started_at = now
        s.child.start()
        log.info("%s started again (pid %s)", s.child.name, s.child.pid)
