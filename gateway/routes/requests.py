"""`GET /v1/requests/{id}` (state, queue position, worker) and
`POST /v1/requests/{id}/cancel` — for the id in any reply's `X-Request-ID`, or the client's
own `X-Request-ID` if it sent a sane one (letters, digits and `._:/=+-`, 128 at most), from
any gateway of the cluster, by the key that sent the request (or the admin key). A client
finds its request by its own id at once, while the reply (and our id) waits for the first
token."""

from __future__ import annotations

from fastapi import APIRouter

from common.errors import Cancelled, InvalidRequest, RequestNotFound
from common.tracking import RequestRecord, RequestState
from gateway.deps import State
from gateway.tenancy.ownership import Caller, CallerDep

router = APIRouter(tags=["requests"])


async def _record(state: State, request_id: str, caller: Caller) -> RequestRecord:
    """By our id (`X-Request-ID` on the reply) or by the client's own `X-Request-ID`."""
    record = await state.dispatcher.tracker.find(request_id, caller.owner)
    why = f"No request {request_id!r} (unknown, or finished over an hour ago)."
    return caller.own(record, RequestNotFound(why))


@router.get("/v1/requests/{request_id}")
async def get_request(request_id: str, state: State, caller: CallerDep) -> RequestRecord:
    return await _record(state, request_id, caller)


@router.post("/v1/requests/{request_id}/cancel")
async def cancel_request(request_id: str, state: State, caller: CallerDep) -> RequestRecord:
    """Queued: it never runs. Running: its worker closes the llama-server stream. Either
    way its client gets a `cancelled` error at once."""
    record = await _record(state, request_id, caller)
    if record.state.final:
        raise InvalidRequest(
            f"Request {request_id!r} already ended ({record.state.value}).",
            code="request_already_ended",
            status=409,
        )
    await state.dispatcher.cancel(
        record.request_id, started=record.state is RequestState.RUNNING, model=record.model
    )
    if record.channel:
        await state.dispatcher.notify(record.channel, Cancelled())
    return await _record(state, request_id, caller)
