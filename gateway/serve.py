"""The gateway's HTTP server: uvicorn, with a drain on SIGTERM and Ctrl-C.

uvicorn by itself stops accepting, waits `timeout_graceful_shutdown` for open requests,
then cancels them: a client mid-request got a plain-text 500 (and the log a traceback).
Here the shutdown first drains (`GatewayState.drain`): `/health` turns 503 so a load
balancer routes around the gateway, open requests get `drain_timeout` seconds to finish,
and those left end with an OpenAI error (a stream's error event, or a 503 to retry
elsewhere), so uvicorn's own timeout never has to cancel anything.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from common.settings import Settings

SHUTDOWN_MARGIN_S = 5.0  # after the drain, for the replies it ended to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self._app.state, "corral", None)
        drained = (
            asyncio.create_task(state.drain(self._drain_timeout), name="corral-drain")
            if state is not None
            else None
        )
        try:
            await super().shutdown(sockets)
        finally:
            if drained is not None and not drained.done():
                drained.cancel()


def serve(app: FastAPI, settings: Settings, http: Any) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,  # our handlers (text or JSON), not uvicorn's own
        http=http,  # slowloris: a deadline on the head
        timeout_graceful_shutdown=int(settings.drain_timeout + SHUTDOWN_MARGIN_S),
    )
    DrainingServer(config, app, settings.drain_timeout).run()
