"""POST /v1/responses, GET and DELETE /v1/responses/{id}, its input_items, and cancel (response_plan.py
says where a response runs; its turn is a chat turn on the thread's session)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..conversation.threads import StoredResponse, ThreadStore
from ..deps import OwnerDep, ServingDep, ThreadsDep
from ..errors import APIError
from ..generation import check_model, sampling_params, start_turn
from ..response_objects import ResponseRun, response_events
from ..response_plan import ResponsePlanner, not_found
from ..schemas_responses import CreateResponseRequest, item_page
from ..streaming import TurnStream

router = APIRouter(tags=["responses"])
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Annotated[Literal["asc", "desc"], Query()]


@router.post("/responses", response_model=None)
async def create_response(
    body: CreateResponseRequest, request: Request, serving: ServingDep, owner: OwnerDep, threads: ThreadsDep
) -> Response:
    if body.model is not None:
        check_model(serving, body.model)
    params = sampling_params(serving, body, body.max_output_tokens, "max_output_tokens", False, 0)
    planner = ResponsePlanner(serving, threads)
    target = await planner.target(owner, body)
    plan = await serving.manager.plan_chat(owner, target.session_id, target.messages, mode=target.mode)
    await planner.check(target, plan)
    turn, first = await start_turn(serving, plan, params, "input", request)
    conversation = body.conversation if target.thread is not None else None
    run = ResponseRun(turn, body, serving.model_name, target.instructions, conversation)
    if target.thread is not None:
        turn.on_commit = lambda _: planner.save(target, run)
    if body.stream:
        return TurnStream(turn, response_events(run, first), {})
    await turn.collect(first, request)
    if (error := turn.error()) is not None:
        raise error
    return JSONResponse(run.finished())


async def _stored(threads: ThreadStore, owner: str, response_id: str) -> StoredResponse:
    stored = await threads.response(owner, response_id)
    if stored is None:
        raise not_found("response", response_id, "response_id")
    return stored


@router.get("/responses/{response_id}")
async def get_response(response_id: str, owner: OwnerDep, threads: ThreadsDep) -> dict[str, Any]:
    return (await _stored(threads, owner, response_id)).body


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, owner: OwnerDep, threads: ThreadsDep) -> dict[str, Any]:
    await threads.delete_response(await _stored(threads, owner, response_id))
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    owner: OwnerDep,
    threads: ThreadsDep,
    limit: Limit = 20,
    order: Order = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    stored = await _stored(threads, owner, response_id)
    return item_page(stored.input, limit, order, after)


@router.post("/responses/{response_id}/cancel")
async def cancel_response(response_id: str, owner: OwnerDep, threads: ThreadsDep) -> dict[str, Any]:
    """Only background responses can be cancelled, and this server runs none: a stored response is finished."""
    await _stored(threads, owner, response_id)
    raise APIError(
        400,
        "only background responses can be cancelled; this response has finished (to stop a streaming "
        "response, close its stream: generation stops within one step)",
        param="response_id",
        code="response_not_cancellable",
    )
