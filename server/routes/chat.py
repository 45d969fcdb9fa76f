"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..deps import OwnerDep, ServingDep, SessionHeader, session_id
from ..errors import APIError
from ..generation import check_model, sampling_params, session_headers, start_turn
from ..responses import ResponseMeta, chat_completion
from ..schemas import ChatCompletionRequest
from ..streaming import TurnStream, chat_stream

router = APIRouter(tags=["chat"])


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    serving: ServingDep,
    owner: OwnerDep,
    x_session_id: SessionHeader = None,
) -> Response:
    check_model(serving, body.model)
    sid = session_id(serving, body.session_id, x_session_id)
    if len(body.messages) > serving.settings.server.max_messages:
        limit = serving.settings.server.max_messages
        raise APIError(400, f"more than {limit} messages", param="messages", code="invalid_value")
    max_tokens, max_param = body.token_limit()
    logprobs, top_logprobs = bool(body.logprobs), body.top_logprobs or 0
    params = sampling_params(serving, body, max_tokens, max_param, logprobs, top_logprobs)
    plan = await serving.manager.plan_chat(owner, sid, body.conversation(), mode=body.session_mode)
    turn, first = await start_turn(serving, plan, params, "messages", request)
    meta = ResponseMeta.new(serving, "chatcmpl", plan.session_id)
    headers = session_headers(plan.session_id)
    if body.stream:
        return TurnStream(turn, chat_stream(turn, first, meta, body.include_usage), headers)
    await turn.collect(first, request)
    if (error := turn.error()) is not None:
        raise error
    return JSONResponse(chat_completion(turn, meta).model_dump(mode="json"), headers=headers)
