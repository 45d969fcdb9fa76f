"""GET /health (readiness) and GET /metrics (Prometheus); neither needs an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import ServingDep

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(serving: ServingDep) -> dict[str, str]:
    """200 once the model is loaded and the engine runs; 503 (OpenAI error body) before and while shutting down."""
    return {"status": "ok", "model": serving.model_name}


@router.get("/metrics")
async def metrics(serving: ServingDep) -> Response:
    await serving.metrics.sample_tiers(serving.engine)
    return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)
