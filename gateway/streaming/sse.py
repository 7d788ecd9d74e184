"""Step 6 of the request path: frames out to the client as OpenAI server-sent events.

The HTTP status is sent once llama-server has accepted the stream (the ACCEPTED frame,
its own 200), so an error reported before that (a prompt too long, say) is a proper
4xx/5xx reply with the OpenAI envelope, and the client reads the headers while the first
token is still being computed rather than just before it. After that, a failure is one
`data: {"error": …}` event, then `data: [DONE]`. A client that disconnects at any point
triggers `on_abandon`, which cancels the task (queued: it never runs; running: its
llama-server stream is closed). A `Tap` (the response cache's) sees every chunk relayed,
and the end of a stream that ended well.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from common.errors import CorralError
from common.frames import Frame, FrameType
from gateway.aio import cancel_and_wait
from gateway.errors import send_error
from gateway.streaming.hub import Subscription

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

# Give the request up (the client left, or the stream failed: why, if it failed)
GiveUp = Callable[[CorralError | None], Awaitable[None]]


def encode_chunks(frame: Frame) -> bytes:
    return b"".join(b"data: " + c.encode() + b"\n\n" for c in frame.chunks)


def error_event(err: CorralError) -> bytes:
    return b"data: " + json.dumps(err.envelope()).encode() + b"\n\n"


class Tap(Protocol):
    def add(self, chunks: list[str]) -> None: ...
    def done(self, usage: dict[str, Any] | None) -> None: ...


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """An ASGI response relaying one subscription as SSE (a `Response` subclass only so
    FastAPI passes it through untouched)."""

    def __init__(
        self,
        sub: Subscription,
        on_abandon: GiveUp,
        headers: dict[str, str],
        tap: Tap | None = None,
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self._sub = sub
        self._tap = tap
        self._on_abandon = on_abandon
        self._extra_headers = headers
        self._started = False
        self._failure: CorralError | None = None  # what ended the stream, if it failed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            await cancel_and_wait(pump)
            self._sub.close()
        # Read even when it is not raised: a send that failed as the pump was cancelled (the
        # client gone) would otherwise be logged as "Task exception was never retrieved".
        failure = None if pump.cancelled() else pump.exception()
        if not self._sub.finished:  # no final frame came: the client left, or we gave up
            log.info("job=%s abandoned before its worker finished", self._sub.request_id)
            if not self._started:  # no status was sent: counted as the client's (499)
                scope.setdefault("state", {})["client_left"] = True
            await self._on_abandon(self._failure)
        elif failure is not None:
            raise failure

    async def _start(self, send: Send, status: int = 200, ctype: str = "text/event-stream") -> None:
        headers = [(b"content-type", ctype.encode()), (b"cache-control", b"no-cache")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self._extra_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self._started = True

    async def _pump(self, send: Send) -> None:
        try:
            async for frame in self._sub.frames():
                if frame.type is FrameType.ACCEPTED and not self._started:
                    await self._start(send)  # headers out while the first token is computed
                elif frame.type is FrameType.CHUNKS:
                    if not self._started:
                        await self._start(send)
                    await send(
                        {
                            "type": "http.response.body",
                            "body": encode_chunks(frame),
                            "more_body": True,
                        }
                    )
                    if self._tap is not None:
                        self._tap.add(frame.chunks)
        except CorralError as err:
            self._failure = err
            if not self._started:
                await self._error_reply(send, err)
                return
            await send({"type": "http.response.body", "body": error_event(err), "more_body": True})
        if not self._started:
            await self._start(send)
        if self._tap is not None and self._failure is None:
            self._tap.done(self._sub.usage)
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def _error_reply(self, send: Send, err: CorralError) -> None:
        await send_error(send, err, self._extra_headers)
        self._started = True
