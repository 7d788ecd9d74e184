"""FastAPI dependencies, one `Annotated` alias each."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.state import GatewayState


async def get_state(request: Request) -> GatewayState:  # async: no thread hop
    state: GatewayState = request.app.state.corral
    return state


State = Annotated[GatewayState, Depends(get_state)]
