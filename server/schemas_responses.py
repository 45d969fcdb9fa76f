"""Request models of the Responses and Conversations APIs, and the message items they carry.

Items are OpenAI's message items: {"type": "message", "role", "content": [parts]}, text parts only
(`input_text`, or `output_text` for assistant messages). Everything else a request may name (tools,
reasoning, background, images, files, other item types) is refused with a 400 naming the field.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .conversation.chain import utf8_text
from .errors import APIError
from .schemas import _REQUEST, GenerationRequest, _unsupported

Item = dict[str, Any]
ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(role: str, text_parts: list[str], item_id: str | None = None) -> Item:
    """A message item as stored and returned: input_text parts, output_text for the assistant's."""
    if role == "assistant":
        content = [{"type": "output_text", "text": t, "annotations": [], "logprobs": []} for t in text_parts]
    else:
        content = [{"type": "input_text", "text": t} for t in text_parts]
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "status": "completed",
        "role": role,
        "content": content,
    }


def item_text(item: Item) -> str:
    """A message item's text as the chat template gets it (parts joined by newlines, as chat content)."""
    return "\n".join(part["text"] for part in item["content"])


def as_message(item: Item) -> dict[str, str]:
    role = item["role"]
    return {"role": "system" if role == "developer" else role, "content": item_text(item)}


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return utf8_text(part, where)
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be a content part object")
    kind = part.get("type")
    if kind not in _TEXT_PARTS:
        raise ValueError(f"{where}: content parts of type {kind!r} are not supported (only text)")
    return utf8_text(part.get("text"), f"{where}.text")


def parse_items(value: Any, what: str) -> list[Item]:
    """Input items (a string is one user message) as message items with fresh ids; ValueError if invalid."""
    if isinstance(value, str):
        return [message_item("user", [utf8_text(value, what)])]
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a string or a list of message items")
    items = []
    for i, raw in enumerate(value):
        where = f"{what}[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be a message item object")
        kind = raw.get("type", "message")
        if kind != "message":
            raise ValueError(f"{where}: items of type {kind!r} are not supported (only 'message')")
        role = raw.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}")
        content = raw.get("content")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"{where}.content must be a string or a non-empty list of text parts")
        items.append(
            message_item(role, [_part_text(p, f"{where}.content[{j}]") for j, p in enumerate(parts)])
        )
    return items


def _item_list(value: Any) -> list[Item]:
    if not isinstance(value, list):
        raise ValueError("items must be a list of message items")
    return parse_items(value, "items")


def _metadata(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise ValueError("metadata must be an object of at most 16 string values")
    for key, v in value.items():
        if len(key) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ValueError("metadata keys have at most 64 characters, values are strings of at most 512")
        utf8_text(key, "a metadata key")  # stored in Redis: a lone surrogate is the client's 400, not our 500
        utf8_text(v, "a metadata value")
    return value


_NEUTRAL_RESPONSE: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "include": ([],),
    "background": (False,),
    "text": ({"format": {"type": "text"}}, {}),
    "top_logprobs": (0,),
    "service_tier": ("auto", "default"),
}
"""Responses-API fields of features this server lacks, and the values that ask for none of them."""


class CreateResponseRequest(GenerationRequest):
    """POST /v1/responses (the chat sampling extensions such as seed and top_k apply too)."""

    model: str | None = None  # type: ignore[assignment]
    input: list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    conversation: str | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    include: Any = None
    background: Any = None
    text: Any = None
    top_logprobs: Any = None
    service_tier: Any = None
    reasoning: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    max_tokens: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> list[Item]:
        items = parse_items(value, "input")
        if not items:
            raise ValueError("input must not be empty")
        return items

    @field_validator("instructions", mode="before")
    @classmethod
    def _instructions(cls, value: Any) -> Any:
        return None if value is None else utf8_text(value, "instructions (a string)")

    @field_validator("conversation", mode="before")
    @classmethod
    def _conversation(cls, value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"id"}:
            value = value["id"]
        if value is not None and not isinstance(value, str):
            raise ValueError("conversation must be a conversation id or {'id': ...}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        return _metadata(value)

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _utf8_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else utf8_text(value, info.field_name or "an id")

    @field_validator("tools", "tool_choice", "include", "background", "text", "top_logprobs", "service_tier")
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value not in _NEUTRAL_RESPONSE[info.field_name or ""]:
            raise ValueError("not supported by this server")
        return value

    @field_validator("reasoning", "prompt", "max_tool_calls", "max_tokens")
    @classmethod
    def _unsupported_features(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "max_tokens" and value is not None:
            raise ValueError("the Responses API calls it max_output_tokens")
        return _unsupported(info.field_name, value)

    @field_validator("session_id")
    @classmethod
    def _no_session_id(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("responses continue with previous_response_id or conversation, not session_id")
        return value


class CreateConversationRequest(BaseModel):
    """POST /v1/conversations."""

    model_config = _REQUEST

    items: list[Item] | None = Field(default=None, max_length=20)
    metadata: dict[str, str] | None = None

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        return None if value is None else _item_list(value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        return _metadata(value)


class UpdateConversationRequest(BaseModel):
    """POST /v1/conversations/{id}."""

    model_config = _REQUEST

    metadata: dict[str, str]

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("metadata is required")
        return _metadata(value)


class AddItemsRequest(BaseModel):
    """POST /v1/conversations/{id}/items."""

    model_config = _REQUEST

    items: list[Item] = Field(min_length=1, max_length=20)

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        return _item_list(value)


def item_page(items: list[Item], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """A list object of items ('asc': oldest first), `limit` of them after the item `after` (400 if absent)."""
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    if after is not None and after not in ids:
        raise APIError(400, f"no item {after!r} in this list", param="after", code="invalid_value")
    start = ids.index(after) + 1 if after is not None else 0
    page = ordered[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else "",
        "last_id": page[-1]["id"] if page else "",
        "has_more": start + limit < len(ordered),
    }
