"""Whole (non-streaming) responses and the parts every chunk of a stream repeats."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from .logprobs import chat_logprobs, completion_logprobs
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Envelope,
    PromptTokensDetails,
    Usage,
)
from .serving import Serving
from .turn import Turn

E = TypeVar("E", bound=Envelope)


@dataclass(frozen=True)
class ResponseMeta:
    """id, created, model, system_fingerprint and session_id: the same on every chunk of one response."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    session_id: str | None

    @classmethod
    def new(cls, serving: Serving, prefix: str, session_id: str | None) -> ResponseMeta:
        return cls(
            f"{prefix}-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            serving.model_name,
            serving.fingerprint,
            session_id,
        )

    def make(self, cls: type[E], **fields: Any) -> E:
        """A response or chunk object of this response, with the envelope's fields filled in."""
        return cls(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            session_id=self.session_id,
            **fields,
        )


def usage(turn: Turn) -> Usage:
    """Prompt tokens as the client sent them; those served from the session count as cached."""
    prompt, completion = turn.plan.prompt_tokens, turn.completion_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=turn.plan.cached_tokens),
    )


def finish_reason(turn: Turn) -> str:
    assert turn.final is not None and turn.final.finish_reason in ("stop", "length")
    return turn.final.finish_reason


def chat_completion(turn: Turn, meta: ResponseMeta) -> ChatCompletion:
    s = turn.serving
    logprobs = chat_logprobs(turn.tokens, s.token_text, s.eos) if turn.params.logprobs else None
    choice = ChatChoice(
        message=AssistantMessage(content=turn.text), logprobs=logprobs, finish_reason=finish_reason(turn)
    )
    return meta.make(ChatCompletion, choices=[choice], usage=usage(turn))


def completion(turn: Turn, meta: ResponseMeta) -> Completion:
    s = turn.serving
    logprobs = completion_logprobs(turn.tokens, s.token_text, s.eos) if turn.params.logprobs else None
    choice = CompletionChoice(text=turn.text, logprobs=logprobs, finish_reason=finish_reason(turn))
    return meta.make(Completion, choices=[choice], usage=usage(turn))
