"""Token strings and bytes for logprobs, and the chat / legacy completion logprobs objects built from events.

A token's `bytes` are its exact UTF-8 fragment (a character split over two tokens gives each its part),
read from the vocabulary: byte-level BPE pieces through the GPT-2 byte alphabet, SentencePiece byte
pieces (<0xE2>) as that byte, other SentencePiece pieces with their word marker as a space.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from streaming_core.session import TokenEvent

from .schemas import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each of the 256 byte values, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenText:
    """id -> (display string, UTF-8 bytes), cached per vocabulary entry."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return self.tokenizer.decode([token_id]).encode("utf-8")
        alphabet = _byte_level_alphabet()
        if self.byte_level and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text, raw = self(token_id)
        alts = [TopLogprob(token=self(t)[0], logprob=lp, bytes=self(t)[1]) for t, lp in top]
        return TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alts)


def visible(event: TokenEvent, eos: set[int]) -> bool:
    """Whether an event's token is part of the reply (the EOS that ended it is not)."""
    if event.token is None or event.logprob is None:
        return False
    return not (event.finish_reason == "stop" and event.token in eos)


def chat_logprobs(events: list[TokenEvent], text: TokenText, eos: set[int]) -> ChoiceLogprobs:
    content = []
    for e in events:
        if visible(e, eos):
            assert e.token is not None and e.logprob is not None
            content.append(text.entry(e.token, e.logprob, e.top_logprobs))
    return ChoiceLogprobs(content=content, refusal=None)


def completion_logprobs(
    events: list[TokenEvent], text: TokenText, eos: set[int], offset: int = 0
) -> CompletionLogprobs:
    """The legacy object: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in events:
        if not visible(e, eos):
            continue
        assert e.token is not None and e.logprob is not None
        token = text(e.token)[0]
        out.tokens.append(token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({text(t)[0]: lp for t, lp in e.top_logprobs})
        out.text_offset.append(offset)
        offset += len(token)
    return out
