"""The deadline for a request's head: uvicorn reads it, and by itself waits forever for a
head that trickles in a byte at a time (slowloris), so the deadline lives in a subclass of
uvicorn's protocol, which `corral gateway` runs. The protocol is uvicorn's httptools one
(C parser), not h11, uvicorn's pure-Python fallback (`benchmarks/README.md` has the cost).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def guarded_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing a connection whose request head has not fully
    arrived `header_timeout` seconds after it opened or after its last reply."""

    class GuardedProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.pipeline and not self.transport.is_closing():
                log.debug("closing a connection whose request head took over %g s", header_timeout)
                self.transport.close()

    return GuardedProtocol
