"""Response objects of the Responses API and their stream of events, built from one Turn.

A stream is OpenAI's sequence: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or response.incomplete
at max_output_tokens); each event names itself in the SSE `event:` field and carries a sequence_number
from 0. A turn that fails after the stream started ends with an `error` event, then response.failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import ServerSentEvent

from streaming_core.session import TokenEvent

from .conversation.threads import Item
from .errors import APIError
from .schemas_responses import CreateResponseRequest, message_item, new_id
from .turn import Turn


@dataclass
class ResponseRun:
    """One response being generated: the fields every snapshot of it repeats, and its final form."""

    turn: Turn
    body: CreateResponseRequest
    model: str
    instructions: str | None
    conversation: str | None
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("msg"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    final: dict[str, Any] | None = None

    def output_item(self, status: str) -> Item:
        item = message_item("assistant", [self.turn.text], self.item_id)
        item["status"] = status
        return item

    def snapshot(self, status: str, output: list[Item], **fields: Any) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": b.previous_response_id,
            "conversation": {"id": self.conversation} if self.conversation else None,
            "reasoning": None,
            "service_tier": "default",
            "store": b.store,
            "temperature": self.turn.params.temperature,
            "top_p": self.turn.params.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "truncation": b.truncation or "disabled",
            "metadata": b.metadata or {},
            **({"user": b.user} if b.user is not None else {}),
            **fields,
        }

    def finished(self) -> dict[str, Any]:
        """The completed (or incomplete, at max_output_tokens) response, built once."""
        if self.final is None:
            turn = self.turn
            assert turn.final is not None
            length = turn.final.finish_reason == "length"
            item = self.output_item("incomplete" if length else "completed")
            self.final = self.snapshot(
                "incomplete" if length else "completed",
                [item],
                completed_at=None if length else int(time.time()),
                incomplete_details={"reason": "max_output_tokens"} if length else None,
                usage=usage(turn),
            )
        return self.final

    def failed(self, error: APIError) -> dict[str, Any]:
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        return self.snapshot("failed", [], error={"code": code, "message": error.message})


def usage(turn: Turn) -> dict[str, Any]:
    """Input tokens as the conversation they represent; those served from the session count as cached."""
    plan = turn.plan
    prompt, output = plan.prompt_tokens, turn.completion_tokens
    written = prompt - plan.cached_tokens if plan.session_id else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens, "cache_write_tokens": written},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


async def response_events(run: ResponseRun, first: TokenEvent) -> AsyncIterator[ServerSentEvent]:
    seq = 0

    def event(kind: str, **data: Any) -> ServerSentEvent:
        nonlocal seq
        payload = {"type": kind, **data, "sequence_number": seq}
        seq += 1
        return ServerSentEvent(data=json.dumps(payload, separators=(",", ":")), event=kind)

    where = {"item_id": run.item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.created", response=run.snapshot("in_progress", []))
    yield event("response.in_progress", response=run.snapshot("in_progress", []))
    added = {**run.output_item("in_progress"), "content": []}
    yield event("response.output_item.added", output_index=0, item=added)
    yield event("response.content_part.added", **where, part=empty_part)
    turn = run.turn
    async for token in turn.events(first):
        error = turn.failure(token) if token.finish_reason in ("abort", "error") else turn.store_error
        if token.text and error is None:
            yield event("response.output_text.delta", **where, delta=token.text, logprobs=[])
        if error is not None:
            yield event("error", code=error.code, message=error.message, param=error.param)
            yield event("response.failed", response=run.failed(error))
            return
        if token.finish_reason is None:
            continue
        done = run.finished()
        item = done["output"][0]
        yield event("response.output_text.done", **where, text=turn.text, logprobs=[])
        yield event("response.content_part.done", **where, part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
        yield event(kind, response=done)
