"""The OpenAI Batch API: create, get, list (cursor paging), cancel. A user key sees only
its own batches (`gateway.tenancy.ownership`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from common.batch import Batch
from common.errors import BatchNotFound
from gateway.deps import State
from gateway.tenancy.ownership import Caller, CallerDep

router = APIRouter(tags=["batch"])


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, state: State, caller: CallerDep) -> Batch:
    """Items run at batch priority whatever the key's cap; the key's model list applies."""
    return await state.batches.create(
        body.input_file_id, body.endpoint, body.completion_window, body.metadata, caller
    )


@router.get("/v1/batches")
async def list_batches(
    state: State,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    page, more = await state.batches.store.list(after, limit, caller.viewer)
    return {
        "object": "list",
        "data": [b.model_dump(mode="json") for b in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": more,
    }


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, state: State, caller: CallerDep) -> Batch:
    return await _visible(state, batch_id, caller)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, state: State, caller: CallerDep) -> Batch:
    await _visible(state, batch_id, caller)
    return await state.batches.store.cancel(batch_id)


async def _visible(state: State, batch_id: str, caller: Caller) -> Batch:
    batch = await state.batches.store.load(batch_id)  # 404 if unknown
    return caller.own(batch, BatchNotFound(f"No batch {batch_id!r}.", param="batch_id"))
