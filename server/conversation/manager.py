"""ConversationManager: the API the HTTP layer calls to turn requests into engine turns on persistent sessions.

Semantics
- No session_id: the request is served statelessly (an ephemeral engine session, nothing stored, no id
  returned). A session_id never seen before opens a session with that id (mode "new").
- Sessions belong to their owner (sha256 of the API key, or "anonymous"); another owner's session id
  answers 404 session_not_found, as if it did not exist.
- One request at a time per session: a second one while a turn is planned or running gets 409 session_busy.
  Every plan with a session_id must end in exactly one `commit` or `abandon`.
- Chat, session_mode "auto" (default), decided by the message hash chain (chain.py):
  * the messages start with the session's whole committed history -> "full": the history is verified
    and only what follows the last committed reply is prefilled;
  * they start with the session's first message but diverge (an edited or regenerated history, or a
    resend of a shorter one) -> "rebuilt": the engine session is reset and the whole rendered history is
    prefilled (cached_tokens only what prefix reuse copied); the session continues under the same id. Never silently mixed;
  * otherwise -> "delta": the messages are new and appended (a client sending only each new turn; the
    conversation can then outgrow any request).
  session_mode "full" is "auto" without the fallbacks: a history that does not extend the session
  answers 409 session_conflict. session_mode "delta" always appends.
- The delta of a turn is rendered by the chat template (templates.py) so that, while the conversation fits
  in the cache, the session's tokens equal the full rendered conversation's; a delta-only session renders
  with a bounded stand-in context (the opening system message and the last exchange). A template that
  re-renders earlier turns is rebuilt from the history in "full"/"auto" and refused (400
  template_not_incremental) in "delta".
- usage: prompt_tokens counts the whole stream the turn represents (committed tokens plus the new ones),
  cached_tokens = prompt_tokens - the tokens actually prefilled (a rebuild prefills the sinks and the tail;
  a head the engine copied from another slot, its prefix reuse, is not prefilled).
- When the engine lacks a session Redis still has (restart, another replica, its KV tiers dropped it), the
  plan carries `rebuild` (sinks, tail, tokens_seen): the KV is recomputed and the counters go on. A plan
  made while the engine held the KV still submits that state (`fallback`), so a session the tiers drop
  between planning and submit is rebuilt too, never continued from nothing.
- pin_system_prompt: a session whose first turn opens with a system prompt (given, or injected by the
  template) keeps the rendered head up to the first user content as sinks, so eviction never cuts it
  (needs an engine whose submit takes sink_tokens; the wish is recorded as pin_tokens either way).
- Completions (`plan_completion`) append raw text to a session's stream; a session is either a chat or a
  completion stream, and the other endpoint answers 409 session_conflict.
- Redis is written once per completed turn, whole. Its size per session is bounded whatever the
  conversation's length; the hash chain is kept as first hash, last hash and length (see chain.py).
- With replicas, the commit is fenced by the turn's claim (replicas.py): a turn whose claim expired
  and was taken by another replica is not saved (409 session_claim_lost); its KV is dropped.
- A record written under another model identity (identity.py: another model, vocabulary or cache shape
  on the same Redis) is refused with 409 session_model_mismatch, never rebuilt with foreign token ids;
  DELETE still removes it.
- Redis errors (unavailable, timeouts) propagate to the caller; every path releases the session first,
  so a Redis outage never leaves a session busy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from streaming_core.engine import Handle
from streaming_core.engine_api import EngineAPI
from streaming_core.sampler import SamplingParams

from . import engine_kv
from .chain import normalize
from .errors import (
    ConversationError,
    invalid,
    session_busy,
    session_claim_lost,
    session_model_mismatch,
    session_not_found,
)
from .plan import TurnPlan, TurnState
from .planner import Planner
from .replicas import UNAVAILABLE, Replicas
from .store import SessionRecord, SessionStore
from .templates import TemplateError

__all__ = ["ConversationError", "ConversationManager", "TurnPlan", "TurnState"]

log = logging.getLogger(__name__)
T = TypeVar("T")
MODES = ("auto", "full", "delta")
MAX_SESSION_ID = 256


def default_replica_id() -> str:
    return os.environ.get("STREAMLLM_REPLICA_ID") or socket.gethostname()


class ConversationManager:
    def __init__(
        self,
        engine: EngineAPI,
        tokenizer: Any,
        store: SessionStore,
        *,
        model_name: str,
        pin_system_prompt: bool = True,
        replica_id: str | None = None,
        replicas: Replicas | None = None,
        identity: str = "",
        commit_timeout: float = 1.0,
    ) -> None:
        self.engine, self.tokenizer, self.store = engine, tokenizer, store
        self.replicas = replicas
        """Cross-replica leases and claims (replicas.py); None: this process is the only one."""
        self.model_name, self.replica_id = model_name, replica_id or default_replica_id()
        self.identity = identity
        """Model identity recorded in and required of session records (identity.py); '': not checked."""
        self.commit_timeout = commit_timeout
        """Seconds a commit waits for Redis: a fenced commit arriving later is refused (replicas.Fence)."""
        self.supports_sinks = "sink_tokens" in inspect.signature(engine.submit).parameters
        self.planner = Planner(
            tokenizer,
            engine.config.cache,
            pin_system_prompt=pin_system_prompt,
            supports_sinks=self.supports_sinks,
            model_name=model_name,
            model_id=identity,
            replica_id=self.replica_id,
        )
        self._busy: set[str] = set()

    # -- planning ----------------------------------------------------------------------------------
    async def plan_chat(
        self, owner: str, session_id: str | None, messages: list[dict[str, Any]], mode: str = "auto"
    ) -> TurnPlan:
        if mode not in MODES:
            raise invalid(f"session_mode must be one of {', '.join(MODES)}, got {mode!r}", "session_mode")
        msgs = normalize(messages)
        if not msgs:
            raise invalid("messages must not be empty", "messages")
        if session_id is None:
            return await self._run(self.planner.fresh_chat, owner, None, msgs, None, "stateless")

        async def plan() -> TurnPlan:
            assert session_id is not None
            record = await self._owned(owner, session_id)
            live = await self._live(session_id, record)
            turn = await self._run(self.planner.chat, owner, session_id, msgs, mode, record, live)
            if live and turn.mode == "rebuilt":
                await asyncio.to_thread(self.engine.close_session, session_id)
            return turn

        return await self._claimed(session_id, plan)

    async def plan_completion(self, owner: str, session_id: str | None, prompt: str) -> TurnPlan:
        if session_id is None:
            return await self._run(self.planner.completion, owner, None, prompt, None, False)

        async def plan() -> TurnPlan:
            assert session_id is not None
            record = await self._owned(owner, session_id)
            live = await self._live(session_id, record)
            return await self._run(self.planner.completion, owner, session_id, prompt, record, live)

        return await self._claimed(session_id, plan)

    def submit(
        self, plan: TurnPlan, params: SamplingParams | None, loop: asyncio.AbstractEventLoop | None = None
    ) -> Handle:
        """engine.submit for a plan, with the pinned sink count when the engine takes one."""
        extra: dict[str, Any] = {}
        if plan.sink_tokens is not None and self.supports_sinks:
            extra["sink_tokens"] = plan.sink_tokens
        handle = self.engine.submit(
            plan.session_id, plan.tokens, params, loop=loop, rebuild=plan.rebuild or plan.fallback, **extra
        )
        plan.request_id = handle.request_id
        return handle

    # -- after the turn ----------------------------------------------------------------------------
    async def commit(self, plan: TurnPlan, reply_text: str, finish_reason: str) -> None:
        """Persist a completed turn ('stop' or 'length'); any other finish is an abandon."""
        sid = plan.session_id
        if sid is None or plan.turn is None:
            return
        if finish_reason not in ("stop", "length"):
            await self.abandon(plan)
            return
        down = False
        try:
            state = await asyncio.to_thread(self.engine.session_state, sid)
            if state is None:
                log.warning("session %s vanished from the engine before its turn was committed", sid)
                return
            record, trim = await self._run(self.planner.settle, plan, reply_text, state)
            try:
                await self._save(record)
            except BaseException as e:
                down = isinstance(e, UNAVAILABLE)
                await engine_kv.close(self.engine, sid, plan.request_id)
                raise
            if trim:
                await engine_kv.drop_last(self.engine, sid, trim)
        finally:
            await self._release(sid, redis_down=down)

    async def _save(self, record: SessionRecord) -> None:
        """Write the turn's record, fenced by its claim when there are replicas."""
        fence = self.replicas.fence(record.id, self.commit_timeout) if self.replicas else None
        if self.replicas is not None and fence is None:
            raise session_claim_lost(record.id)
        if not await self.store.put(record, fence):
            raise session_claim_lost(record.id)

    async def abandon(self, plan: TurnPlan) -> None:
        """The turn was aborted or failed: forget the engine's KV (it holds uncommitted tokens), so that the
        next turn rebuilds from the last committed state in Redis, which this turn never touched."""
        sid = plan.session_id
        if sid is None:
            return
        try:
            if not await engine_kv.untouched(self.engine, plan):
                await engine_kv.close(self.engine, sid, plan.request_id)
        finally:
            await self._release(sid)

    # -- session resources -------------------------------------------------------------------------
    async def get(self, owner: str, session_id: str) -> dict[str, Any] | None:
        record = await self.store.get(session_id)
        if record is None or record.owner != owner:
            return None
        return record.summary((await engine_kv.resident(self.engine, [session_id]))[session_id])

    async def list(self, owner: str) -> list[dict[str, Any]]:
        """The owner's sessions, most recently used first."""
        ids = await self.store.ids(owner)
        records = await self.store.get_many(ids)
        await self.store.forget(owner, [sid for sid, r in zip(ids, records, strict=True) if r is None])
        owned = sorted(
            (r for r in records if r is not None and r.owner == owner),
            key=lambda r: r.updated_at,
            reverse=True,
        )
        resident = await engine_kv.resident(self.engine, [r.id for r in owned])
        return [r.summary(resident[r.id]) for r in owned]

    async def delete(self, owner: str, session_id: str) -> bool:
        """Forget a session in Redis and in the engine; False if the owner has no such session."""
        record = await self.store.get(session_id)
        if record is None or record.owner != owner:
            return False
        if session_id in self._busy:
            raise session_busy(session_id)
        await self.store.delete(record)
        await asyncio.to_thread(self.engine.close_session, session_id)
        return True

    # -- internals ---------------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Planner work in a thread; a template that rejects the messages is the client's 400."""
        try:
            return await asyncio.to_thread(fn, *args)
        except TemplateError as e:
            raise invalid(str(e), "messages", "template_error") from e

    async def _claimed(self, session_id: str, plan: Callable[[], Any]) -> TurnPlan:
        """Plan under the session's claim, which commit or abandon releases (or a failed plan, here)."""
        if not session_id or len(session_id) > MAX_SESSION_ID:
            raise invalid(f"session_id must have 1 to {MAX_SESSION_ID} characters", "session_id")
        if session_id in self._busy:
            raise session_busy(session_id)
        self._busy.add(session_id)
        try:
            if self.replicas is not None and not await self.replicas.claim(session_id):
                raise session_busy(session_id)
            result: TurnPlan = await plan()
        except BaseException as e:
            await self._release(session_id, redis_down=isinstance(e, UNAVAILABLE))
            raise
        return result

    async def _release(self, session_id: str, redis_down: bool = False) -> None:
        """Free the session here at once; the Redis claim is released now or, if Redis is away (known
        from the error at hand, which spares the request another timeout), later."""
        self._busy.discard(session_id)
        if self.replicas is not None:
            await self.replicas.release(session_id, later=redis_down)

    async def _owned(self, owner: str, session_id: str) -> SessionRecord | None:
        record = await self.store.get(session_id)
        if record is None:
            return None
        if record.owner != owner:
            raise session_not_found(session_id)
        # Records from before identities were kept carry only the model name.
        recorded, expected = (
            (record.model_id, self.identity) if record.model_id else (record.model, self.model_name)
        )
        if self.identity and recorded != expected:
            raise session_model_mismatch(session_id, recorded, self.identity)
        return record

    async def _live(self, session_id: str, record: SessionRecord | None) -> bool:
        """Whether the engine holds this session's KV as Redis describes it; a stale copy is closed."""
        if record is not None and record.replica and record.replica != self.replica_id and self.replicas:
            await self.replicas.note_move(session_id, record.replica)
        stats = await asyncio.to_thread(self.engine.stats, session_id)
        if stats is None:
            return False
        if stats.busy:
            raise session_busy(session_id)
        if (
            record is not None
            and record.replica == self.replica_id
            and record.tokens_seen == stats.tokens_seen
        ):
            return True
        await asyncio.to_thread(self.engine.close_session, session_id)
        return False
