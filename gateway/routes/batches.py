"""The OpenAI Batch API: create, get, list (cursor paging), cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from common.batch import Batch
from gateway.auth import principal_of
from gateway.deps import State

router = APIRouter(tags=["batch"])


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, state: State, request: Request) -> Batch:
    """Items run at batch priority whatever the key's cap; the key's model list applies."""
    principal = principal_of(request)
    key = principal.key if principal else None
    return await state.batches.create(
        body.input_file_id, body.endpoint, body.completion_window, body.metadata,
        allows_model=key.allows_model if key is not None else None,
    )  # fmt: skip


@router.get("/v1/batches")
async def list_batches(
    state: State,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    page, more = await state.batches.store.list(after, limit)
    return {
        "object": "list",
        "data": [b.model_dump(mode="json") for b in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": more,
    }


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, state: State) -> Batch:
    return await state.batches.store.load(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, state: State) -> Batch:
    return await state.batches.store.cancel(batch_id)
