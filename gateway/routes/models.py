"""`GET /v1/models` and `GET /v1/models/{id}`: the catalog in OpenAI's shape, each model with
its cluster state (`status`, `replicas` ready) as extra fields OpenAI clients ignore. A key
limited to some models sees only those (`gateway.tenancy.ownership`)."""

from __future__ import annotations

from fastapi import APIRouter

from common.errors import ModelNotFound
from common.wire import ModelCard, ModelList
from gateway.cluster import View
from gateway.deps import State
from gateway.tenancy.ownership import CallerDep

router = APIRouter(tags=["openai"])


def _card(alias: str, embedding: bool, view: View) -> ModelCard:
    extra = {
        "status": view.state_of(alias).value,
        "replicas": len(view.ready(alias)),
        "embedding": embedding,
    }
    return ModelCard.model_validate({"id": alias, **extra})


@router.get("/v1/models")
async def list_models(state: State, caller: CallerDep) -> ModelList:
    view = await state.placer.view(0)
    models = await state.catalog.all()
    return ModelList(
        data=[
            _card(alias, m.embedding, view)
            for alias, m in models.items()
            if caller.allows_model(alias)
        ]
    )


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State, caller: CallerDep) -> ModelCard:
    if not caller.allows_model(model_id):
        raise ModelNotFound(model_id)
    model = await state.catalog.get(model_id)  # 404 model_not_found if unknown
    return _card(model_id, model.embedding, await state.placer.view(0))
