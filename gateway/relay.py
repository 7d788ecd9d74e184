"""The generation endpoints' shared path: look the model up, pick the priority, open the
reply channel, enqueue, then stream (SSE) or gather (JSON) what the worker sends back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from common.affinity import affinity_key
from common.errors import CorralError, InvalidRequest, WorkerLost
from common.frames import FrameType
from common.jobs import Job, JobKind
from common.priority import resolve_priority
from common.settings import ModelConfig, Settings
from common.tracking import RequestState
from common.wire import WireModel
from gateway.aio import cancel_and_wait
from gateway.queueing.affinity import preference
from gateway.state import GATEWAY_STOPPING, GatewayState
from gateway.streaming.hub import Subscription
from gateway.streaming.recovery import Requeue
from gateway.streaming.sse import GiveUp, SSEResponse, wait_disconnect
from gateway.tenancy.admission import admit
from gateway.tenancy.ownership import caller_of

log = logging.getLogger(__name__)


async def relay(request: Request, state: GatewayState, kind: JobKind, body: WireModel) -> Response:
    if state.draining:  # a keep-alive connection's request, after the drain began
        raise GATEWAY_STOPPING
    model_name: str = body.model  # type: ignore[attr-defined]
    model = await state.catalog.get(model_name)
    if model.embedding != (kind is JobKind.EMBEDDING):
        what = "an embedding model" if model.embedding else "not an embedding model"
        raise InvalidRequest(
            f"The model {model_name!r} is {what}; it cannot serve {kind.path}.", param="model"
        )
    priority = admit(  # the key's models and priority cap; max_tokens vs context
        request,
        state.settings,
        model_name,
        model,
        body,
        resolve_priority(
            request.headers.get("x-request-priority"), getattr(body, "service_tier", None)
        ),
    )
    request_id: str = request.state.request_id
    timeout = request_timeout(request.headers.get("x-request-timeout"), state.settings)
    fields = with_defaults(body.model_dump(exclude_unset=True), model, kind)
    stream = bool(getattr(body, "stream", False))
    cached = await state.cache.lookup(request, model_name, model, kind, fields)
    headers = {"X-Request-Priority": priority.value, **cached.headers}
    if cached.hit is not None:  # no queue, no worker, no load
        usage = bool((fields.get("stream_options") or {}).get("include_usage"))
        return cached.reply(stream, usage, headers)
    owner = caller_of(request).owner
    session = request.headers.get("x-session-id")
    job = Job(
        request_id=request_id,
        kind=kind,
        model=model_name,
        body=fields,
        stream=stream,
        priority=priority,
        channel=state.hub.channel(request_id),
        deadline=time.time() + timeout,
        owner=owner,
        affinity=affinity_key(kind, fields, session, owner) if model.affinity else None,
    )
    sub = await state.hub.open(request_id, job.deadline, restartable=not job.stream)
    request.state.subscription = sub  # its final usage: rate limits and metrics
    try:
        await state.placer.ensure(model_name, sub)  # load it somewhere if nobody holds it
        client_id = getattr(request.state, "client_request_id", None)
        ready = await state.placer.ready_replicas(model_name)
        prefer = preference(job, model, ready)
        await state.dispatcher.submit(job, client_id=client_id, affinity=prefer)
    except BaseException:
        sub.close()
        raise

    async def resubmit() -> None:
        await state.dispatcher.submit(job, resubmit=True)

    state.hub.enqueued(sub, resubmit)  # queued again if the broker loses it

    async def abandon(failure: CorralError | None = None) -> None:
        expired = time.time() >= job.deadline
        await state.dispatcher.cancel_soon(
            request_id,
            started=sub.worker is not None,
            model=job.model,
            state=RequestState.EXPIRED if expired else RequestState.CANCELLED,
            failure=None if expired else failure,
        )

    if job.stream:
        return SSEResponse(sub, abandon, headers, cached.tap())
    return await _gather(request, sub, abandon, resubmit, headers, cached.keep)


def with_defaults(fields: dict[str, Any], model: ModelConfig, kind: JobKind) -> dict[str, Any]:
    """The request's fields over its model's defaults (sampling fields only; none for
    embeddings): what the client sent always wins."""
    if not model.defaults or kind is JobKind.EMBEDDING:
        return fields
    return {**model.defaults, **fields}


def request_timeout(header: str | None, settings: Settings) -> float:
    """`X-Request-Timeout` (seconds) if given, else `request_timeout`; never above
    `max_request_timeout`."""
    if header is None or not header.strip():
        return min(settings.request_timeout, settings.max_request_timeout)
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise InvalidRequest(
            f"Invalid X-Request-Timeout {header!r}: a number of seconds > 0.",
            param="X-Request-Timeout",
            code="invalid_timeout",
        )
    return min(value, settings.max_request_timeout)


async def _gather(
    request: Request,
    sub: Subscription,
    abandon: GiveUp,
    resubmit: Requeue,
    headers: dict[str, str],
    keep: Callable[[dict[str, Any]], None] | None = None,
) -> Response:
    """Wait for the whole reply, cancelling the task if the client leaves first; `keep`
    sees the reply (the response cache)."""
    result = asyncio.create_task(_result(sub, resubmit))
    left = asyncio.create_task(wait_disconnect(request.receive))
    try:
        await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        sub.close()
    if not result.done():
        await cancel_and_wait(result)
    if not sub.finished:
        failed = result.done() and not result.cancelled() and result.exception()
        await abandon(failed if isinstance(failed, CorralError) else None)
    if not result.done() or result.cancelled():
        return Response(status_code=499)  # nobody is listening
    body = result.result()  # raises the worker's CorralError, if any
    if keep is not None:
        keep(body)
    return JSONResponse(body, headers=headers)


async def _result(sub: Subscription, resubmit: Requeue) -> dict[str, object]:
    """The result body. If the worker dies first, the request is queued once more for
    another worker (a non-streaming request has nothing sent yet, so it can run again;
    its claim makes sure it runs at most twice in all)."""
    for attempt in (1, 2):
        try:
            async for frame in sub.frames():
                if frame.type is FrameType.RESULT and frame.body is not None:
                    return frame.body
            break
        except WorkerLost:
            if attempt == 2:
                raise
            log.warning("job=%s worker %s lost; queued again", sub.request_id, sub.worker)
            sub.restart()
            await resubmit()
    raise CorralError("The worker ended the request without a result.")
