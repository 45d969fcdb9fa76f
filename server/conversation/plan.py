"""What planning a turn produces: the public TurnPlan the HTTP layer submits, and the private state commit needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming_core.engine import Rebuild

from .store import SessionRecord

Message = dict[str, str]


@dataclass
class TurnState:
    """What commit needs to know about a planned turn besides its tokens."""

    owner: str
    kind: str
    record: SessionRecord | None
    """The session as of the plan (None: a new session)."""
    base_seen: int
    """The engine session's tokens_seen before this turn's tokens."""
    turn_text: str
    """The text `tokens` encode."""
    messages: list[Message] = field(default_factory=list)
    """What the turn's full render is made of (chat): the whole history, or context + reply + new messages."""
    chain_first: str = ""
    chain_last: str = ""
    chain_len: int = 0
    pin_tokens: int = 0
    sink_tokens: int = 0
    rebuilt: bool = False


@dataclass
class TurnPlan:
    """One planned turn: what to submit to the engine, what to report as usage, and what commit needs.

    `session_id` None is a stateless request: served on an ephemeral engine session, nothing stored.
    """

    session_id: str | None
    tokens: list[int]
    """What to pass to engine.submit: only the new part when the session's KV is reused."""
    prompt_tokens: int
    """Tokens of the whole rendered prompt this turn represents (usage.prompt_tokens)."""
    cached_tokens: int
    """Prompt tokens served from the session instead of being recomputed."""
    rebuild: Rebuild | None
    """Pass to engine.submit: the engine lacks the session's KV but Redis has what rebuilds it."""
    mode: str
    """'stateless', 'new', 'full', 'delta' or 'rebuilt'."""
    sink_tokens: int | None = None
    """Sinks to open the engine session with (the system prompt pinned); None: the engine's default."""
    boundary_clean: bool = True
    """The delta tokenized on its own equals the full render's tokenization (see templates.Delta)."""
    request_id: str | None = None
    """Set by ConversationManager.submit."""
    fallback: Rebuild | None = None
    """The committed state, when the engine held the KV at planning: submitted as the rebuild, which the
    engine ignores while it still holds the session and applies if its KV tiers dropped it meanwhile."""
    turn: TurnState | None = field(default=None, repr=False)
