"""Bounds on what a client may send: body size (413), the time to send the body (408) and
the time to send the request head (the connection is closed).

The body is read here in full, within `body_timeout`, before the route sees it, and then
handed on: a slow or endless body never ties up a route, and a body over `max_body_bytes`
is refused from its `Content-Length` alone, or as soon as a chunked one grows past it.
A multipart upload (a batch file, up to `max_file_bytes`) is not held here but counted as
the route reads it, each part within `body_timeout`.
The request head is uvicorn's to read, so its deadline lives in a protocol subclass
(`guarded_protocol`): uvicorn by itself waits forever for a head that trickles in a byte at
a time (slowloris). The protocol is uvicorn's httptools one (C parser): h11, uvicorn's
pure-Python fallback, costs about a millisecond more per request on a small core.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.errors import CorralError, PayloadTooLarge
from common.settings import Settings

log = logging.getLogger(__name__)


async def send_error(send: Send, err: CorralError, extra: dict[str, str] | None = None) -> None:
    """Reply with `err` in the OpenAI envelope, from a middleware (outside the app's
    exception handlers)."""
    body = json.dumps(err.envelope()).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)),
               **err.headers(), **(extra or {})}  # fmt: skip
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestTimeout(CorralError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


# The body was not read to its end: the connection cannot carry another request.
_CLOSE = {"connection": "close"}


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self._max = settings.max_body_bytes
        # A batch file upload (multipart) may be larger; it is streamed, not held here.
        self._max_upload = max(settings.max_body_bytes, settings.max_file_bytes + 2**20)
        self._timeout = settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is None or not ("content-length" in headers or "transfer-encoding" in headers):
            await self.app(scope, receive, send)
            return
        upload = headers.get("content-type", "").startswith("multipart/form-data")
        limit = self._max_upload if upload else self._max
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0  # h11 has already refused a malformed Content-Length
        if declared > limit:
            await send_error(send, _too_large(limit), _CLOSE)
            return
        if upload:
            await self.app(scope, self._counted(receive, limit), send)
            return
        try:
            async with asyncio.timeout(self._timeout):  # no task per request, unlike wait_for
                first = await self._read(receive)
        except TimeoutError:
            log.info("%s %s: body not received within %.0f s", scope["method"], scope["path"],
                     self._timeout)  # fmt: skip
            await send_error(send, self._slow(), _CLOSE)
            return
        except _TooLarge:
            await send_error(send, _too_large(limit), _CLOSE)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _read(self, receive: Receive) -> Message:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message  # the client left: the app sees the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max:
                raise _TooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    def _counted(self, receive: Receive, limit: int) -> Receive:
        """An upload's body as it comes, each part within `body_timeout`, in all within
        `limit`. FastAPI turns an HTTPException raised while it reads into its reply."""
        size = 0

        async def counted() -> Message:
            nonlocal size
            try:
                async with asyncio.timeout(self._timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, self._slow().message, _CLOSE) from None
            size += len(message.get("body", b""))
            if size > limit:
                raise HTTPException(413, _too_large(limit).message, _CLOSE)
            return message

        return counted

    def _slow(self) -> RequestTimeout:
        return RequestTimeout(f"The request body did not arrive within {self._timeout:g} s.")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


class _TooLarge(Exception):
    pass


def _replay(first: Message, receive: Receive) -> Receive:
    """The whole body as one message, then the real channel (disconnect notices)."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


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
