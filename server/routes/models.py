"""GET /v1/models and /v1/models/{model}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServingDep
from ..generation import check_model
from ..schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


def _card(serving: ServingDep) -> ModelCard:
    return ModelCard(id=serving.model_name, created=serving.created)


@router.get("/models")
async def list_models(serving: ServingDep) -> ModelList:
    return ModelList(data=[_card(serving)])


@router.get("/models/{model:path}")
async def retrieve_model(model: str, serving: ServingDep) -> ModelCard:
    check_model(serving, model)
    return _card(serving)
