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

__all__ = ["ConversationError", "canonical", "chain", "content_text", "link", "normalize"]

Message = dict[str, str]


def content_text(content: Any, param: str = "messages") -> str:
    """A message's content as one string: strings as they are, None as "", text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            part = part if isinstance(part, Mapping) else getattr(part, "__dict__", {})
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"only text content parts are supported, got {part.get('type')!r}", param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"message content must be a string or a list of parts, got {type(content).__name__}", param)


def normalize(messages: Iterable[Mapping[str, Any]]) -> list[Message]:
    """Messages reduced to what is hashed and rendered: {"role", "content"} with string content."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"messages[{i}] has no role", f"messages[{i}].role")
        out.append({"role": role, "content": content_text(m.get("content"), f"messages[{i}].content")})
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
