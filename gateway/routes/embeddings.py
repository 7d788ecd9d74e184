"""Step 1 of the request path: `POST /v1/embeddings`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common.jobs import JobKind
from common.wire import EmbeddingRequest
from gateway.deps import State
from gateway.relay import relay

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request, body: EmbeddingRequest, state: State) -> Response:
    return await relay(request, state, JobKind.EMBEDDING, body)
