"""gateway.streaming.sse as a unit (the real path is covered end to end in test_openai_e2e): the
reply's status and headers go out when llama-server accepted the stream (ACCEPTED),
before the first token, and an error before that is a proper error reply."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from starlette.types import Message

from common.errors import CorralError, ErrorBody
from common.frames import Frame, FrameType
from gateway.streaming.hub import Subscription
from gateway.streaming.sse import SSEResponse


class Hub:
    """The one thing a Subscription asks its hub for here: to be forgotten."""

    def close(self, request_id: str) -> None:
        pass


async def relay(frames: list[Frame]) -> list[Message]:
    sub = Subscription(Hub(), "req_1", time.time() + 10)  # type: ignore[arg-type]
    sent: list[Message] = []
    seen_start = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            seen_start.set()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client stays
        return {}

    async def abandon(failure: CorralError | None) -> None:
        raise AssertionError("the stream ended normally")

    reply = asyncio.create_task(SSEResponse(sub, abandon, {})({}, receive, send))
    for frame in frames:
        if frame.type is FrameType.CHUNKS:  # the token comes after the headers went out
            await asyncio.wait_for(seen_start.wait(), 2)
        sub.deliver(frame)
    await asyncio.wait_for(reply, 5)
    return sent


def test_headers_go_out_on_accepted_before_the_first_token() -> None:
    sent = asyncio.run(
        relay(
            [
                Frame(seq=0, type=FrameType.START, worker="w1"),
                Frame(seq=1, type=FrameType.ACCEPTED),
                Frame(seq=2, type=FrameType.CHUNKS, chunks=['{"a":1}']),
                Frame(seq=3, type=FrameType.DONE),
            ]
        )
    )
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b'data: {"a":1}\n\n'
    assert sent[2]["body"] == b"data: [DONE]\n\n" and not sent[2]["more_body"]


def test_an_error_before_accepted_is_an_error_reply() -> None:
    error = ErrorBody(message="the prompt is too long", type="invalid_request_error")
    sent = asyncio.run(
        relay(
            [
                Frame(seq=0, type=FrameType.START, worker="w1"),
                Frame(seq=1, type=FrameType.ERROR, error=error, status=400),
            ]
        )
    )
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert b"the prompt is too long" in sent[1]["body"]


def test_a_send_failing_as_the_client_leaves_is_not_left_unretrieved() -> None:
    """The client disconnects while a send is blocked; cancelled, the send fails (a closed
    transport): the request is abandoned, and that failure is not logged later as a task
    exception nobody retrieved."""

    async def scenario() -> tuple[list[str], list[dict[str, Any]]]:
        sub = Subscription(Hub(), "req_1", time.time() + 10)  # type: ignore[arg-type]
        abandoned: list[str] = []
        unretrieved: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
        sending = asyncio.Event()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                sending.set()
                try:
                    await asyncio.sleep(3600)  # a client that stopped reading
                except asyncio.CancelledError:
                    raise OSError("the transport is closed") from None

        async def receive() -> dict[str, Any]:
            await sending.wait()
            return {"type": "http.disconnect"}

        async def abandon(failure: CorralError | None) -> None:
            abandoned.append(sub.request_id)

        for frame in (
            Frame(seq=0, type=FrameType.START, worker="w1"),
            Frame(seq=1, type=FrameType.CHUNKS, chunks=['{"a":1}']),
        ):
            sub.deliver(frame)
        await asyncio.wait_for(SSEResponse(sub, abandon, {})({}, receive, send), 5)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        return abandoned, unretrieved

    abandoned, unretrieved = asyncio.run(scenario())
    assert abandoned == ["req_1"]
    assert unretrieved == []
