"""POST /v1/completions: raw text continuation, in a session or stateless."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..deps import OwnerDep, ServingDep, SessionHeader, session_id
from ..generation import check_model, sampling_params, session_headers, start_turn
from ..responses import ResponseMeta, completion
from ..schemas import CompletionRequest
from ..streaming import TurnStream, completion_stream

router = APIRouter(tags=["completions"])


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    serving: ServingDep,
    owner: OwnerDep,
    x_session_id: SessionHeader = None,
) -> Response:
    check_model(serving, body.model)
    sid = session_id(serving, body.session_id, x_session_id)
    logprobs = body.logprobs is not None
    params = sampling_params(serving, body, body.max_tokens, "max_tokens", logprobs, body.logprobs or 0)
    plan = await serving.manager.plan_completion(owner, sid, body.prompt)
    turn, first = await start_turn(serving, plan, params, "prompt", request)
    meta = ResponseMeta.new(serving, "cmpl", plan.session_id)
    headers = session_headers(plan.session_id)
    if body.stream:
        return TurnStream(turn, completion_stream(turn, first, meta, body.include_usage), headers)
    await turn.collect(first, request)
    if (error := turn.error()) is not None:
        raise error
    return JSONResponse(completion(turn, meta).model_dump(mode="json"), headers=headers)
