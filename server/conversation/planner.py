"""Turn planning and settling: plain, synchronous bookkeeping between messages, tokens and session records.

The manager runs these in a worker thread (rendering and tokenizing a long history takes a while) and
does all the I/O: Redis, the engine, the one-request-per-session claim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streaming_core.config import CacheConfig
from streaming_core.engine import Rebuild
from streaming_core.scheduler import common_prefix

from .chain import chain, link
from .errors import invalid, session_conflict
from .plan import TurnPlan, TurnState
from .store import SessionRecord
from .templates import (
    KVEnd,
    Message,
    TemplateError,
    assistant,
    bounded_context,
    continuation,
    decode,
    encode,
    locate,
    render,
    settle,
    system_head,
    turn_delta,
)

log = logging.getLogger(__name__)


class Planner:
    def __init__(
        self,
        tokenizer: Any,
        cache: CacheConfig,
        *,
        pin_system_prompt: bool,
        supports_sinks: bool,
        model_name: str,
        replica_id: str,
        model_id: str = "",
    ) -> None:
        self.tok, self.cache = tokenizer, cache
        self.pin, self.supports_sinks = pin_system_prompt, supports_sinks
        self.model_name, self.replica_id, self.model_id = model_name, replica_id, model_id

    # -- chat --------------------------------------------------------------------------------------
    def chat(
        self, owner: str, sid: str, msgs: list[Message], mode: str, record: SessionRecord | None, live: bool
    ) -> TurnPlan:
        """Plan a chat turn on session `sid` (see the manager's docstring for the modes)."""
        if record is None:
            return self.fresh_chat(owner, sid, msgs, None, "new")
        if record.kind != "chat":
            raise session_conflict(f"session {sid!r} holds a raw completion stream, not a chat")
        hashes = chain(msgs)
        known = record.chain_len
        extends = 0 < known < len(msgs) and hashes[known - 1] == record.chain_last
        if extends and mode != "delta":
            return self._full(owner, sid, msgs, record, live, hashes[-1])
        if mode == "full":
            raise session_conflict(
                f"the messages do not extend session {sid!r} ({known} messages committed): "
                "resend its history unchanged plus the new messages, or use session_mode 'auto' to rebuild"
            )
        if mode == "auto" and hashes[0] == record.chain_first:
            return self.fresh_chat(owner, sid, msgs, record, "rebuilt")
        return self._delta(owner, sid, msgs, record, live)

    def fresh_chat(
        self, owner: str, sid: str | None, msgs: list[Message], record: SessionRecord | None, mode: str
    ) -> TurnPlan:
        """The whole rendered conversation as the prompt: stateless, a new session, or a rebuilt one."""
        if sid is not None:
            _require_prompt(msgs)
        text = render(self.tok, msgs)
        tokens = encode(self.tok, text)
        if not tokens:
            raise invalid("the messages render to no tokens", "messages")
        pin, sinks = self._pin(msgs, tokens)
        hashes = chain(msgs)
        turn = TurnState(owner, "chat", record, 0, text, msgs, hashes[0], hashes[-1], len(msgs), pin, sinks)
        turn.rebuilt = mode == "rebuilt"
        wide = sinks if sinks != self.cache.sink_tokens else None
        return TurnPlan(sid, tokens, len(tokens), 0, None, mode, sink_tokens=wide, turn=turn)

    def _full(
        self, owner: str, sid: str, msgs: list[Message], record: SessionRecord, live: bool, last: str
    ) -> TurnPlan:
        known = record.chain_len
        new = msgs[known:]
        _require_prompt(new)
        end = KVEnd(record.kv_back, record.kv_ahead)
        try:
            delta, _ = turn_delta(self.tok, msgs[: known - 1], msgs[known - 1]["content"], end, new)
        except TemplateError as e:
            log.info("session %s: %s; rebuilding from the resent history", sid, e)
            return self.fresh_chat(owner, sid, msgs, record, "rebuilt")
        return self._continued(owner, sid, record, live, "full", delta, msgs, last, len(msgs))

    def _delta(self, owner: str, sid: str, new: list[Message], record: SessionRecord, live: bool) -> TurnPlan:
        _require_prompt(new)
        end = KVEnd(record.kv_back, record.kv_ahead)
        try:
            delta, _ = turn_delta(self.tok, record.context, record.reply, end, new)
        except TemplateError as e:
            raise invalid(
                f"{e}; resend the whole history instead of only the new messages",
                "messages",
                "template_not_incremental",
            ) from e
        messages = [*record.context, assistant(record.reply), *new]
        last = chain(new, start=record.chain_last)[-1]
        return self._continued(
            owner, sid, record, live, "delta", delta, messages, last, record.chain_len + len(new)
        )

    def _continued(
        self,
        owner: str,
        sid: str,
        record: SessionRecord,
        live: bool,
        mode: str,
        delta: Any,
        messages: list[Message],
        last: str,
        length: int,
    ) -> TurnPlan:
        if not delta.tokens:
            raise invalid("the new messages render to no tokens", "messages")
        turn = TurnState(owner, "chat", record, record.tokens_seen, delta.text, messages)
        turn.chain_first, turn.chain_last, turn.chain_len = record.chain_first, last, length
        return self._resumed(sid, record, live, mode, delta.tokens, turn, delta.clean)

    def _resumed(
        self,
        sid: str,
        record: SessionRecord,
        live: bool,
        mode: str,
        tokens: list[int],
        turn: TurnState,
        clean: bool,
    ) -> TurnPlan:
        """A turn appended to a stored session, rebuilt from Redis first when the engine lacks its KV."""
        turn.pin_tokens, turn.sink_tokens = record.pin_tokens, record.sink_tokens
        state = Rebuild(record.sinks, record.tail, record.tokens_seen) if record.tokens_seen else None
        rebuild = None if live else state
        turn.rebuilt = rebuild is not None
        prefilled = len(tokens) + (len(record.sinks) + len(record.tail) if rebuild else 0)
        prompt = record.tokens_seen + len(tokens)
        wide = record.sink_tokens if state and record.sink_tokens != self.cache.sink_tokens else None
        plan = TurnPlan(sid, tokens, prompt, prompt - prefilled, rebuild, mode, wide, clean, turn=turn)
        plan.fallback = state if live else None
        return plan

    def _pin(self, msgs: list[Message], tokens: list[int]) -> tuple[int, int]:
        """(head tokens to pin, sinks the session gets): the rendered system prompt kept as sinks."""
        sinks = self.cache.sink_tokens
        head = system_head(self.tok, msgs) if self.pin else ""
        pin = common_prefix(encode(self.tok, head), tokens) if head else 0
        if pin > self.cache.capacity // 2:
            log.warning(
                "system prompt of %d tokens is too long to pin in a %d-token cache", pin, self.cache.capacity
            )
            return pin, sinks
        return pin, max(sinks, pin) if self.supports_sinks else sinks

    # -- completions -------------------------------------------------------------------------------
    def completion(
        self, owner: str, sid: str | None, prompt: str, record: SessionRecord | None, live: bool
    ) -> TurnPlan:
        """Raw text: the first segment of a stream gets the tokenizer's special tokens, later ones are appended."""
        if record is None:
            tokens = list(self.tok(prompt, add_special_tokens=True)["input_ids"])
            if not tokens:
                raise invalid("prompt must not be empty", "prompt")
            turn = TurnState(owner, "completion", None, 0, decode(self.tok, tokens))
            turn.sink_tokens = self.cache.sink_tokens
            mode = "stateless" if sid is None else "new"
            return TurnPlan(sid, tokens, len(tokens), 0, None, mode, turn=turn)
        if record.kind != "completion":
            raise session_conflict(
                f"session {record.id!r} is a chat session; continue it with chat completions"
            )
        text = record.pending + prompt
        tokens = encode(self.tok, text)
        if not tokens:
            raise invalid("prompt must not be empty", "prompt")
        turn = TurnState(owner, "completion", record, record.tokens_seen, text)
        return self._resumed(record.id, record, live, "delta", tokens, turn, True)

    # -- commit ------------------------------------------------------------------------------------
    def settle(self, plan: TurnPlan, reply: str, state: Rebuild) -> tuple[SessionRecord, int]:
        """The session record after a completed turn, and how many tokens to drop from the engine's KV."""
        turn = plan.turn
        assert turn is not None and plan.session_id is not None
        evicted = state.tokens_seen > len(state.sinks) + len(state.tail)
        known = list(state.tail) if evicted else [*state.sinks, *state.tail]
        fed_count = max(0, state.tokens_seen - turn.base_seen - len(plan.tokens))
        after = reply if turn.kind == "completion" else continuation(self.tok, turn.messages, reply)
        if after is None:
            after = reply
        if fed_count <= len(known):
            fed = known[len(known) - fed_count :]
            max_trim = len(state.tail) if evicted else len(known)
            settled = settle(self.tok, turn.turn_text, plan.tokens, fed, after, max_trim)
        else:
            settled = locate(self.tok, after, known)
        if state.tokens_seen > len(state.sinks):  # the sinks are full: their count is what the engine used
            turn.sink_tokens = len(state.sinks)
        kept = _trimmed(state, settled.trim, turn.sink_tokens)
        record = self._record(plan.session_id, turn, kept)
        record.last_mode, record.last_prompt_tokens = plan.mode, plan.prompt_tokens
        record.last_cached_tokens = plan.cached_tokens
        if turn.kind == "chat":
            record.context, record.reply = bounded_context(turn.messages), reply
            record.kv_back, record.kv_ahead = settled.end.back, settled.end.ahead
            record.chain_first, record.chain_len = turn.chain_first, turn.chain_len + 1
            record.chain_last = link(turn.chain_last, assistant(reply))
        else:
            end = settled.end
            record.pending = end.back + reply if end.back else reply[len(end.ahead) :]
        return record, settled.trim

    def _record(self, sid: str, turn: TurnState, kept: Rebuild) -> SessionRecord:
        old, now = turn.record, time.time()
        return SessionRecord(
            id=sid,
            owner=turn.owner,
            kind=turn.kind,
            model=self.model_name,
            model_id=self.model_id,
            replica=self.replica_id,
            created_at=old.created_at if old else now,
            updated_at=now,
            turns=(old.turns if old else 0) + 1,
            rebuilds=(old.rebuilds if old else 0) + int(turn.rebuilt),
            tokens_seen=kept.tokens_seen,
            cache_tokens=len(kept.sinks) + len(kept.tail),
            sink_tokens=turn.sink_tokens,
            window=self.cache.capacity - turn.sink_tokens,  # pinned sinks come out of the window
            pin_tokens=turn.pin_tokens,
            sinks=list(kept.sinks),
            tail=list(kept.tail),
        )


def _require_prompt(new: list[Message]) -> None:
    if not new:
        raise invalid("no new messages to answer", "messages")
    if new[-1]["role"] == "assistant":
        raise invalid("the last message must not be an assistant reply in a session", "messages")


def _trimmed(state: Rebuild, n: int, sink_tokens: int) -> Rebuild:
    """The session's state without its last n tokens."""
    if n == 0:
        return state
    if state.tokens_seen > len(state.sinks) + len(state.tail):
        return Rebuild(list(state.sinks), list(state.tail)[: len(state.tail) - n], state.tokens_seen - n)
    stream = [*state.sinks, *state.tail][: state.tokens_seen - n]
    return Rebuild(stream[:sink_tokens], stream[sink_tokens:], len(stream))
