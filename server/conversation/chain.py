"""Message hash chain: h_0 = "", h_i = sha256(h_{i-1} + canonical JSON of message i's role and content).

h_i commits to messages 1..i, so a resent history extends a session exactly when its hash at the
session's length equals the session's last hash; the session therefore stores only its first hash,
its last hash and its length (constant size, however long the conversation).
Content given as a list of parts (OpenAI's content parts) counts as its text parts joined by newlines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConversationError, invalid

__all__ = ["ConversationError", "canonical", "chain", "content_text", "link", "normalize", "utf8_text"]

Message = dict[str, str]


def utf8_text(value: Any, what: str) -> str:
    """A string that UTF-8 can carry (lone surrogates from JSON escapes are refused, not crashed on)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate)") from e
    return value


def content_text(content: Any) -> str:
    """A message's content as one string: strings as they are, None as "", text parts joined by newlines.
    Raises ValueError (the request schema's 400s) for anything else."""
    if content is None:
        return ""
    if isinstance(content, str):
        return utf8_text(content, "content")
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of text content parts")
    texts = []
    for part in content:
        part = part if isinstance(part, Mapping) else getattr(part, "__dict__", {})
        if part.get("type") != "text":
            raise ValueError(f"content parts of type {part.get('type')!r} are not supported (only 'text')")
        texts.append(utf8_text(part.get("text"), "a text content part's text"))
    return "\n".join(texts)


def normalize(messages: Iterable[Mapping[str, Any]]) -> list[Message]:
    """Messages reduced to what is hashed and rendered: {"role", "content"} with string content."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"messages[{i}] has no role", f"messages[{i}].role")
        try:
            content = content_text(m.get("content"))
        except ValueError as e:
            raise invalid(str(e), f"messages[{i}].content") from e
        out.append({"role": role, "content": content})
    return out


def canonical(message: Mapping[str, str]) -> str:
    """Canonical JSON of (role, content): sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(
        {"role": message["role"], "content": message["content"]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def link(previous: str, message: Mapping[str, str]) -> str:
    return hashlib.sha256((previous + canonical(message)).encode()).hexdigest()


def chain(messages: Iterable[Mapping[str, str]], start: str = "") -> list[str]:
    """h_1..h_n of `messages`, continuing from hash `start` ("" for a conversation's first message)."""
    hashes, h = [], start
    for m in messages:
        h = link(h, m)
        hashes.append(h)
    return hashes
