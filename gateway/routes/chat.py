"""Step 1 of the request path: `POST /v1/chat/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from common.jobs import JobKind
from common.wire import ChatCompletionRequest
from gateway.deps import State
from gateway.relay import relay

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest, state: State) -> Response:
    return await relay(request, state, JobKind.CHAT, body)
