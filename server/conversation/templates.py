"""Turn deltas rendered with the tokenizer's chat template, so that a session's tokens stay the rendered conversation's.

Invariant kept here: while a conversation fits in the cache, the tokens a session has consumed equal the
tokenization of its full rendered conversation, so greedy replies equal a stateless request carrying the
whole history.

- A session that has consumed text A = render(context, generation prompt) + (part of) the reply receives,
  for its next turn, the text B[len(A):] where B = render(context + reply + new messages, generation prompt).
  This needs B to start with A: true for templates that render each message independently of the later
  ones (ChatML, Llama-2 [INST] with <<SYS>>, Llama-3, Mistral). `context` is either the whole resent
  history or a bounded stand-in for it (the opening system message and the last exchange): templates that
  treat the first message or the role alternation specially render the same delta from it.
- The delta is tokenized on its own (no special tokens added); `Delta.clean` records whether that equals
  tokenizing A and B whole (it does when A ends on a token boundary of B, which `settle` arranges).
- After a turn the KV holds the turn's tokens plus the generated tokens but the last (the engine feeds a
  sampled token only when generation goes on). `settle` keeps the longest prefix of that which equals the
  canonical tokenization of the rendered reply and what follows it; the rest (the unfed last token, text
  cut by a stop string, a reply the template trims, tokens that merge across the reply's end) is dropped
  from the KV and re-sent at the start of the next delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streaming_core.scheduler import common_prefix

PROBE = "\x00"
"""Content of a probe message: marks where a rendered message's content starts."""
SYSTEM_PROBE = "\x01"
CONTEXT_CHARS = 2048
"""Characters of each message content kept in a delta-only session's render context (the tail)."""
CONTEXT_MESSAGES = 16
"""Messages after the last reply kept in that context (besides the opening system message)."""
_BACKOFF = 16
_ANCHOR = 64
REPLACEMENT = "\ufffd"

Message = dict[str, str]


class TemplateError(ValueError):
    """The chat template rejected the messages, or does not render turns incrementally."""


@dataclass(frozen=True)
class KVEnd:
    """Where a session's KV ends relative to the rendered prompt of its last turn.

    `back`: the end of that prompt the KV does not hold; `ahead`: text after the prompt that it does hold
    (a prefix of the rendered reply). At most one of them is non-empty.
    """

    back: str = ""
    ahead: str = ""


@dataclass(frozen=True)
class Delta:
    text: str
    tokens: list[int]
    clean: bool
    """tokenize(A) + tokens == tokenize(B): the boundary did not change the tokenization."""


@dataclass(frozen=True)
class Settled:
    end: KVEnd
    trim: int
    """Tokens to drop from the end of the session's KV."""


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = True) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's TemplateError, raise_exception() in templates, missing template
        raise TemplateError(f"the chat template rejected the messages: {e}") from e
    return str(text)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; templates write their own BOS, so none is added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return str(tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False))


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def consumed(tokenizer: Any, context: Sequence[Message], end: KVEnd) -> str:
    """A: the text the session holds, given the messages its last reply answered."""
    prompt = render(tokenizer, context)
    if not prompt.endswith(end.back):
        raise TemplateError("the template renders the last prompt differently than when it was consumed")
    return prompt[: len(prompt) - len(end.back)] + end.ahead


def turn_delta(
    tokenizer: Any, context: Sequence[Message], reply: str, end: KVEnd, new: Sequence[Message]
) -> tuple[Delta, str]:
    """The text and tokens that extend a session holding `consumed(context, end)` by the reply and `new`.

    Returns the delta and B, the full render it completes. Raises TemplateError when B does not start
    with what the session holds (a template that re-renders earlier turns).
    """
    a = consumed(tokenizer, context, end)
    b = render(tokenizer, [*context, assistant(reply), *new])
    if not b.startswith(a):
        raise TemplateError("the chat template re-renders earlier turns: no incremental delta exists")
    text = b[len(a) :]
    tokens = encode(tokenizer, text)
    return Delta(text, tokens, encode(tokenizer, a) + tokens == encode(tokenizer, b)), b


def continuation(tokenizer: Any, messages: Sequence[Message], reply: str) -> str | None:
    """What follows render(messages) once `reply` is committed, up to the next user message's content.

    None when the template cannot tell (it rejects a following user message, or re-renders the prompt).
    """
    prompt = render(tokenizer, messages)
    try:
        after = render(tokenizer, [*messages, assistant(reply), {"role": "user", "content": PROBE}])
    except TemplateError:
        return None
    if not after.startswith(prompt) or PROBE not in after[len(prompt) :]:
        return None
    rest = after[len(prompt) :]
    return rest[: rest.rindex(PROBE)]


def settle(
    tokenizer: Any, turn_text: str, turn_tokens: Sequence[int], fed: Sequence[int], after: str, max_trim: int
) -> Settled:
    """Align the KV with the canonical tokenization once a turn has ended (see the module docstring).

    The KV ends with `turn_tokens` (the tokenized `turn_text`) then `fed`; the conversation goes on with
    `after`. At most `max_trim` tokens may be dropped.
    """
    stream = [*turn_tokens, *fed]
    text = turn_text + after
    anchor = max(0, len(turn_tokens) - _ANCHOR)
    head = decode(tokenizer, turn_tokens[anchor:])
    if turn_text.endswith(head) and not head.startswith(REPLACEMENT):
        base = len(turn_text) - len(head)  # text position of token `anchor`: decoding works from there
        canon = encode(tokenizer, text)
        keep = common_prefix(stream, canon)
        for k in range(keep, max(keep - _BACKOFF, len(stream) - max_trim, anchor) - 1, -1):
            s = decode(tokenizer, canon[anchor:k])
            if text.startswith(s, base):
                return _settled(turn_text, after, base + len(s), len(stream) - k)
    return _settle_reply(tokenizer, fed, after, max_trim)


def _settle_reply(tokenizer: Any, fed: Sequence[int], after: str, max_trim: int) -> Settled:
    """Fallback for tokenizers whose decode does not give back the text: keep the prompt and the fed tokens
    whose text continues `after`; past what may be trimmed, keep everything and place the end by text."""
    lowest = max(len(fed) - min(max_trim, _BACKOFF), 0)
    for k in range(len(fed), lowest - 1, -1):
        s = decode(tokenizer, fed[:k])
        if after.startswith(s):
            return Settled(KVEnd(ahead=s), len(fed) - k)
    return Settled(KVEnd(ahead=after[: common_prefix(after, decode(tokenizer, fed))]), 0)


def locate(tokenizer: Any, after: str, fed_tail: Sequence[int]) -> Settled:
    """End of a KV whose fed tokens are known only in part (a reply longer than the window): place it
    after the last occurrence of their text; nothing is trimmed."""
    s = decode(tokenizer, fed_tail).lstrip("\ufffd")
    at = after.rfind(s) if s else -1
    return Settled(KVEnd(ahead=after[: at + len(s)] if at >= 0 else after), 0)


def _settled(turn_text: str, after: str, end: int, trim: int) -> Settled:
    if end <= len(turn_text):
        return Settled(KVEnd(back=turn_text[end:]), trim)
    return Settled(KVEnd(ahead=after[: end - len(turn_text)]), trim)


def system_head(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The rendered text to pin in a session's sinks: everything before the first user content when the
    conversation opens with a system prompt, given or injected by the template; "" otherwise."""
    user = {"role": "user", "content": PROBE}
    try:
        if messages and messages[0]["role"] == "system":
            probe = render(tokenizer, [messages[0], user])
        else:
            probe = render(tokenizer, [user])
            if not _injects_system(tokenizer, probe):
                return ""
    except TemplateError:
        return ""
    head = probe[: probe.find(PROBE)] if PROBE in probe else ""
    full = render(tokenizer, messages)
    return head[: common_prefix(head, full)]


def _injects_system(tokenizer: Any, user_only: str) -> bool:
    """Whether the template writes a default system message when the conversation has none: the render
    of a lone user message opens like a system message and holds more than that opening."""
    try:
        with_system = render(
            tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": PROBE}]
        )
    except TemplateError:
        return False
    if SYSTEM_PROBE not in with_system or PROBE not in user_only:
        return False
    opener = with_system[: with_system.find(SYSTEM_PROBE)]
    head = user_only[: user_only.find(PROBE)]
    return bool(opener) and head.startswith(opener) and head != opener


def bounded_context(messages: Sequence[Message]) -> list[Message]:
    """Stand-in for a history the session no longer sees: the opening system message and the messages
    after the last assistant reply, contents cut to their last CONTEXT_CHARS characters."""
    start = max((i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    system = [messages[0]] if messages and messages[0]["role"] == "system" else []
    recent = list(messages[max(start, len(system)) :])[-CONTEXT_MESSAGES:]
    return [{"role": m["role"], "content": m["content"][-CONTEXT_CHARS:]} for m in [*system, *recent]]
