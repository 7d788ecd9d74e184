"""The generation endpoints' shared path: look the model up, pick the priority, open the
reply channel, enqueue, then stream (SSE) or gather (JSON) what the worker sends back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from common.errors import CorralError, InvalidRequest
from common.frames import FrameType
from common.jobs import Job, JobKind
from common.priority import resolve_priority
from common.wire import WireModel
from gateway.sse import SSEResponse, wait_disconnect
from gateway.state import GatewayState
from gateway.stream import Subscription

Abandon = Callable[[], Awaitable[None]]


async def relay(request: Request, state: GatewayState, kind: JobKind, body: WireModel) -> Response:
    model_name: str = body.model  # type: ignore[attr-defined]
    model = await state.catalog.get(model_name)
    if model.embedding != (kind is JobKind.EMBEDDING):
        what = "an embedding model" if model.embedding else "not an embedding model"
        raise InvalidRequest(
            f"The model {model_name!r} is {what}; it cannot serve {kind.path}.", param="model"
        )
    priority = resolve_priority(
        request.headers.get("x-request-priority"), getattr(body, "service_tier", None)
    )
    request_id: str = request.state.request_id
    job = Job(
        request_id=request_id,
        kind=kind,
        model=model_name,
        body=body.model_dump(exclude_unset=True),
        stream=bool(getattr(body, "stream", False)),
        priority=priority,
        channel=state.hub.channel(request_id),
        deadline=time.time() + state.settings.request_timeout,
    )
    sub = state.hub.open(request_id, job.deadline)
    try:
        await state.dispatcher.submit(job)
    except BaseException:
        sub.close()
        raise
    headers = {"X-Request-Priority": priority.value}

    async def abandon() -> None:
        await state.dispatcher.cancel(request_id, started=sub.worker is not None)

    if job.stream:
        return SSEResponse(sub, abandon, headers)
    return await _gather(request, sub, abandon, headers)


async def _gather(
    request: Request, sub: Subscription, abandon: Abandon, headers: dict[str, str]
) -> Response:
    """Wait for the whole reply, cancelling the task if the client leaves first."""
    result = asyncio.create_task(_result(sub))
    left = asyncio.create_task(wait_disconnect(request.receive))
    try:
        await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        sub.close()
    if not result.done():
        result.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await result
    if not sub.finished:
        await abandon()
    if not result.done() or result.cancelled():
        return Response(status_code=499)  # nobody is listening
    body = result.result()  # raises the worker's CorralError, if any
    return JSONResponse(body, headers=headers)


async def _result(sub: Subscription) -> dict[str, object]:
    async for frame in sub.frames():
        if frame.type is FrameType.RESULT and frame.body is not None:
            return frame.body
    raise CorralError("The worker ended the request without a result.")
