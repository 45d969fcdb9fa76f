"""GET /health (readiness) and GET /metrics (Prometheus); neither needs an API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import LifecycleDep, ServingDep
from ..errors import APIError

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=None)
async def health(serving: ServingDep, lifecycle: LifecycleDep) -> dict[str, str] | JSONResponse:
    """200 {"status": "ok"} once the model is loaded, the engine runs and Redis answers a PING; 503 with an
    OpenAI error body before that and while shutting down, and 503 {"status": "degraded", "error": ...}
    with Retry-After while Redis does not answer (this replica cannot serve sessions meanwhile)."""
    if await lifecycle.check_redis():
        return {"status": "ok", "model": serving.model_name}
    retry_after = str(lifecycle.settings.redis.retry_after_seconds)
    err = APIError(503, "degraded: session storage (Redis) is unavailable", code="redis_unavailable")
    body: dict[str, Any] = {"status": "degraded", "model": serving.model_name, "redis": "unavailable"}
    return JSONResponse(body | err.body(), status_code=503, headers={"Retry-After": retry_after})


@router.get("/metrics")
async def metrics(serving: ServingDep) -> Response:
    await serving.metrics.sample_tiers(serving.engine)
    return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)
