"""OpenAI protocol models: requests as accepted here, responses and stream chunks as sent.

Requests accept unknown fields (ignored) so that any OpenAI client works; fields of features this server
does not implement are accepted when null or neutral and refused with a 400 naming the field otherwise.
Types are strict: "0.5" is not a number and 1 is not a boolean.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .conversation.chain import content_text, utf8_text

_REQUEST = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
_NEUTRAL: dict[str, Any] = {
    "tool_choice": ("none",),
    "function_call": ("none",),
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "parallel_tool_calls": (True, False),
}
"""Values of unsupported fields that ask for nothing; null is always accepted."""


def _unsupported(name: str | None, value: Any) -> Any:
    if value is not None and value not in _NEUTRAL.get(name or "", ()):
        raise ValueError("not supported by this server")
    return value


class Message(BaseModel):
    """One chat message; content is normalised to text."""

    model_config = _REQUEST

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None
    tool_calls: Any = None
    function_call: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        return content_text(value)

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_tools(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, value)


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class GenerationRequest(BaseModel):
    """Sampling and streaming fields shared by chat completions and completions."""

    model_config = _REQUEST

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    session_id: str | None = None
    n: int | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("model", "user", "session_id")
    @classmethod
    def _utf8(cls, value: str | None, info: ValidationInfo) -> str | None:
        # echoed, stored in Redis or used as keys: a lone surrogate is the client's 400, not our 500
        return None if value is None else utf8_text(value, info.field_name or "a string")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > 4:
            raise ValueError("stop must be a string or a list of at most 4 strings")
        return [utf8_text(s, "a stop sequence") for s in stops if s != ""]

    @field_validator("n", "logit_bias")
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, value)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    session_mode: Literal["auto", "full", "delta"] = "auto"
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def token_limit(self) -> tuple[int | None, str]:
        """max_completion_tokens (OpenAI's current name) if given, else max_tokens; with the field's name."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the conversation layer takes them (developer messages are system messages)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in self.messages
        ]

    @field_validator(
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "response_format",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
    )
    @classmethod
    def _unsupported_features(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, value)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions (legacy text completion)."""

    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("prompt must be a string (or a list holding one string)")
        return utf8_text(value, "prompt")

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _unsupported_features(cls, value: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, value)


def _drop_none(field: Any = None) -> Any:
    return Field(field, exclude_if=lambda v: v is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class Envelope(BaseModel):
    """Fields every response object and stream chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    session_id: str | None = _drop_none()


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = _drop_none()
    content: str | None = _drop_none()


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = _drop_none()


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Envelope):
    """A text completion, and (with finish_reason None until the last) each of its stream chunks."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = _drop_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "streamllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response, and the last event of a stream that fails after it started."""

    error: ErrorDetail
