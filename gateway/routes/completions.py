"""Step 1 of the request path: `POST /v1/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common.jobs import JobKind
from common.wire import CompletionRequest
from gateway.deps import State
from gateway.relay import relay

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest, state: State) -> Response:
    return await relay(request, state, JobKind.COMPLETION, body)
