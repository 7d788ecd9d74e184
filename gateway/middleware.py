"""Pure-ASGI middleware (no per-chunk overhead on streams): a request id on every reply."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.jobs import new_request_id


class RequestIdMiddleware:
    """Gives each request a unique id (`X-Request-ID` on the reply; the task id too).

    The id is always generated here, never taken from the client: it names the Celery
    task and its claim, and two requests sharing one would see one of them dropped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
