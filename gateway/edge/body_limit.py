"""Bounds on what a client may send: body size (413) and the time to send the body (408).

The body is read here in full, within `body_timeout`, before the route sees it, and then
handed on: a slow or endless body never ties up a route, and a body over `max_body_bytes`
is refused from its `Content-Length` alone, or as soon as a chunked one grows past it.
A multipart upload (a batch file, up to `max_file_bytes`) is not held here but counted as
the route reads it, each part within `body_timeout`.
The request head's own deadline is `gateway.edge.head_timeout`'s.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import PayloadTooLarge, RequestTimeout
from common.settings import Settings
from gateway.errors import send_error

log = logging.getLogger(__name__)


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
            log.info(
                "%s %s: body not received within %.0f s",
                scope["method"],
                scope["path"],
                self._timeout,
            )
            await send_error(send, self._slow(), _CLOSE)
            return
        except PayloadTooLarge:
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
                raise _too_large(self._max)
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


def _replay(first: Message, receive: Receive) -> Receive:
    """The whole body as one message, then the real channel (disconnect notices)."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
