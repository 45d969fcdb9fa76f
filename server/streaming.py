"""Server-sent event streams of chat completions and completions (sse-starlette).

Chat: a first chunk with the assistant role, content deltas (empty ones skipped unless logprobs were asked
for), a chunk with the finish_reason and an empty delta, a usage chunk with no choices when
stream_options.include_usage, then `data: [DONE]`. An error after the stream started is one last
`data: {"error": {...}}` event, then [DONE]. A client that disconnects cancels the generator: the turn is
aborted in the engine at once (its slot freed within one step) and abandoned.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from streaming_core.session import TokenEvent

from .logprobs import chat_logprobs, completion_logprobs, visible
from .responses import ResponseMeta, usage
from .schemas import ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice, Delta
from .turn import Turn

DONE = ServerSentEvent(data="[DONE]")


def _sse(payload: BaseModel | dict[str, Any]) -> ServerSentEvent:
    data = (
        payload.model_dump_json()
        if isinstance(payload, BaseModel)
        else json.dumps(payload, separators=(",", ":"))
    )
    return ServerSentEvent(data=data)


class TurnStream(EventSourceResponse):
    """An SSE response that settles its turn however the response ends, even before the first event."""

    def __init__(self, turn: Turn, content: AsyncIterator[ServerSentEvent], headers: dict[str, str]) -> None:
        grace = turn.serving.settings.server.shutdown_grace_seconds
        super().__init__(content, headers=headers, sep="\n", shutdown_grace_period=grace + 15)
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.turn.settled:
                self.turn.cancel()


async def chat_stream(
    turn: Turn, first: TokenEvent, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    s, logprobs = turn.serving, turn.params.logprobs

    def chunk(delta: Delta, **choice: Any) -> ServerSentEvent:
        return _sse(meta.make(ChatCompletionChunk, choices=[ChunkChoice(delta=delta, **choice)]))

    yield chunk(Delta(role="assistant", content=""))
    async for event in turn.events(first):
        if event.finish_reason in ("abort", "error"):
            yield _sse(turn.failure(event).body())
            break
        lp = chat_logprobs([event], s.token_text, s.eos) if logprobs and visible(event, s.eos) else None
        if event.text or lp is not None:
            yield chunk(Delta(content=event.text), logprobs=lp)
        if turn.store_error is not None:
            yield _sse(turn.store_error.body())
            break
        if event.finish_reason is not None:
            yield chunk(Delta(), finish_reason=event.finish_reason)
            if include_usage:
                yield _sse(meta.make(ChatCompletionChunk, choices=[], usage=usage(turn)))
    yield DONE


async def completion_stream(
    turn: Turn, first: TokenEvent, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    s, logprobs, offset = turn.serving, turn.params.logprobs, 0

    def chunk(**choice: Any) -> ServerSentEvent:
        return _sse(meta.make(Completion, choices=[CompletionChoice(**choice)]))

    async for event in turn.events(first):
        if event.finish_reason in ("abort", "error"):
            yield _sse(turn.failure(event).body())
            break
        lp = None
        if logprobs and visible(event, s.eos):
            lp = completion_logprobs([event], s.token_text, s.eos, offset)
            offset += sum(len(t) for t in lp.tokens)
        if event.text or lp is not None:
            yield chunk(text=event.text, logprobs=lp)
        if turn.store_error is not None:
            yield _sse(turn.store_error.body())
            break
        if event.finish_reason is not None:
            yield chunk(text="", finish_reason=event.finish_reason)
            if include_usage:
                yield _sse(meta.make(Completion, choices=[], usage=usage(turn)))
    yield DONE
