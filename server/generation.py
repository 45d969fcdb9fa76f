"""What the chat and completion routes share: model check, sampling parameters, starting a planned turn."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from streaming_core.sampler import SamplingParams
from streaming_core.session import TokenEvent

from .conversation.manager import TurnPlan
from .errors import APIError
from .schemas import GenerationRequest
from .serving import Serving
from .turn import Turn


def check_model(serving: Serving, model: str) -> None:
    if model != serving.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {serving.model_name!r}",
            param="model",
            code="model_not_found",
        )


def sampling_params(
    serving: Serving,
    body: GenerationRequest,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The request's sampling fields as engine parameters; out-of-range values are 400s naming the field."""
    limits = serving.settings.server
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise APIError(
            400,
            f"{max_tokens_param} is {max_tokens}, more than this server's limit of {limits.max_tokens_cap}",
            param=max_tokens_param,
            code="invalid_value",
        )
    fields: dict[str, Any] = {
        "max_tokens": max_tokens or limits.default_max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": None if body.top_k in (None, -1) else body.top_k,
        "seed": body.seed,
        "stop": tuple(body.stop or ()),
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
    }
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        param = str(e).split()[0]
        raise APIError(400, str(e), param=param if param in fields else None, code="invalid_value") from e


async def start_turn(
    serving: Serving, plan: TurnPlan, params: SamplingParams, param: str, request: Request | None = None
) -> tuple[Turn, TokenEvent]:
    """Check the plan against the per-request prompt limit, submit it, and wait for its first event
    (a `request` whose client disconnects meanwhile aborts the turn)."""
    limit = serving.settings.server.max_prompt_tokens
    if len(plan.tokens) > limit:
        await serving.manager.abandon(plan)
        raise APIError(
            400,
            f"this request needs {len(plan.tokens)} prompt tokens, more than this server's limit of {limit}",
            param=param,
            code="context_length_exceeded",
        )
    turn = Turn(serving, plan, params)
    return turn, await turn.start(request)


def session_headers(session_id: str | None) -> dict[str, str]:
    return {"X-Session-ID": session_id} if session_id else {}
