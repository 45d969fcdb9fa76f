"""The frozen batch description the scheduler hands to the runner, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    """Tokens of one session to push through the model in this step."""

    slot: int
    """Pool slot that holds the session's KV."""
    start: int
    """Stream index of tokens[0], i.e. tokens the slot has consumed so far."""
    tokens: tuple[int, ...]
    """A single token for decode, a prompt chunk for prefill."""
    logits: str = "last"
    """'none' (mid-prompt chunk), 'last' (sample the next token) or 'all' (perplexity evaluation)."""
    sinks: int | None = None
    """The session's sink count when it differs from the pool's (a pinned system prompt); the window
    shrinks by as much, so the slot's capacity is unchanged."""


@dataclass(frozen=True)
class BatchPlan:
    """One engine step: KV moves first, then every chunk goes through a single forward."""

    chunks: tuple[SeqChunk, ...]
    offload: tuple[tuple[str, int], ...] = ()
    """(session id, slot): copy the slot down the KV tiers; no one gets the slot until the copy is done."""
    restore: tuple[tuple[str, int], ...] = ()
    """(session id, slot): copy the session's claimed tier snapshot into the slot."""
    clear: tuple[int, ...] = ()
    """Slots handed to sessions with no KV yet."""
    drop: tuple[str, ...] = ()
    """Sessions whose tier copies (host or disk) are no longer needed."""
    share: tuple[tuple[int, int, int], ...] = ()
    """(source slot, slot, n): a new session's first n entries are the source's (the same tokens from the
    stream's start), copied before anything else moves; source == slot: they are already there."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass
class StepOutput:
    """Logits per chunk index of the plan: [1, V] for 'last', [len(tokens), V] for 'all'."""

    logits: dict[int, torch.Tensor]
