"""`GET /v1/models` and `GET /v1/models/{id}`: the catalog in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter

from common.wire import ModelCard, ModelList
from gateway.deps import State

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
async def list_models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=alias) for alias in await state.catalog.all()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> ModelCard:
    await state.catalog.get(model_id)  # 404 model_not_found if unknown
    return ModelCard(id=model_id)
