"""The outermost edge: a request id on every reply, and on every log line of the request.

Pure ASGI (no per-chunk overhead on streams)."""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import logctx
from common.errors import CorralError
from common.jobs import new_request_id
from gateway.errors import REDIS_AWAY, send_error

log = logging.getLogger(__name__)


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

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        client_id = logctx.sane_client_id(Headers(scope=scope).get("x-request-id"))
        scope["state"]["client_request_id"] = client_id  # an alias of ours, per API key
        bound = logctx.bind(request_id, client_id)  # on every log line of this request
        try:
            await self.app(scope, receive, send_with_id)
        except RedisError as exc:  # the broker away, below the app (a middleware's read)
            log.warning("request=%s Redis unavailable: %r", request_id, exc)
            if started:
                raise
            await send_error(send_with_id, REDIS_AWAY)
        except Exception:
            # Caught here, not in Starlette's outermost error middleware, so that even a
            # 500 carries the OpenAI envelope and the request id.
            log.exception("request=%s unexpected error", request_id)
            if started:
                raise
            await send_error(send_with_id, CorralError("Internal error in the gateway."))
        finally:
            logctx.unbind(bound)
