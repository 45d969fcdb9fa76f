"""Where a Responses-API request runs: which thread and chat session, and which messages the turn prefills.

- No previous_response_id and no conversation: a new chain thread with a new session (the whole input).
- A conversation, or the latest response of a chain (its `head`), whose session still stands as the thread
  last committed it (the session record's turn count matches): the session continues in delta mode, only
  the new input and any items added since (conversations) are prefilled.
- The same thread when its session cannot be continued (expired, a committed item deleted, other
  instructions): a new session for the thread, prefilled with all its items (cached_tokens only what prefix reuse copied).
- Chaining to an older response (a branch, a regenerate), or to a response of a conversation: a fork, a
  new chain thread whose items are a copy of the history up to that response, on a new session. The
  original thread and session are untouched, so both branches stay cheap to continue. Histories never mix.
- store false: nothing is stored; the request is served statelessly over the history it names.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from .conversation.errors import ConversationError, invalid
from .conversation.plan import TurnPlan
from .conversation.threads import Item, StoredResponse, Thread, ThreadStore, thread_conflict
from .response_objects import ResponseRun
from .schemas_responses import CreateResponseRequest, as_message, new_id
from .serving import Serving

log = logging.getLogger(__name__)


def not_found(what: str, object_id: str, param: str) -> ConversationError:
    return ConversationError(
        404, f"no {what} {object_id!r}", type="not_found_error", param=param, code=f"{what}_not_found"
    )


@dataclass
class ResponseTarget:
    """What a response's turn runs on and what its commit writes."""

    owner: str
    thread: Thread | None
    """None: store false (stateless, nothing written)."""
    session_id: str | None
    messages: list[dict[str, str]]
    mode: str
    """The chat session_mode: 'delta' to continue the thread's session, 'auto' to open a new one."""
    input: list[Item]
    instructions: str | None
    new_thread: bool = False
    copied: list[Item] = field(default_factory=list)
    """History items a forked thread starts with (written with the first response)."""
    replaced_session: str = ""
    """The thread's former session, deleted once the new one is committed."""

    @property
    def continues(self) -> bool:
        return self.mode == "delta"


def _system(instructions: str | None) -> list[dict[str, str]]:
    return [] if instructions is None else [{"role": "system", "content": instructions}]


def history_up_to(stored: StoredResponse, history: list[Item]) -> list[Item]:
    """The thread's items up to and including the response's output; its own input and output when the
    cap has dropped that output from the thread already."""
    ids = [item["id"] for item in history]
    last = stored.output[-1]["id"]
    return history[: ids.index(last) + 1] if last in ids else [*stored.input, *stored.output]


def _pending(thread: Thread, history: list[Item]) -> list[Item]:
    """Items added after the last one the thread's session holds."""
    ids = [item["id"] for item in history]
    return history[ids.index(thread.committed) + 1 :] if thread.committed in ids else history


class ResponsePlanner:
    def __init__(self, serving: Serving, threads: ThreadStore) -> None:
        self.serving, self.threads = serving, threads

    async def target(self, owner: str, body: CreateResponseRequest) -> ResponseTarget:
        if body.conversation is not None and body.previous_response_id is not None:
            raise invalid("previous_response_id cannot be used with conversation", "previous_response_id")
        if body.input[-1]["role"] == "assistant":
            raise invalid("the last input item must not be an assistant message", "input")
        if body.conversation is not None:
            thread = await self.threads.get(owner, body.conversation)
            if thread is None:
                raise not_found("conversation", body.conversation, "conversation")
            history = await self.threads.items(thread.id)
            if not body.store:
                return self._stateless(owner, body, thread.instructions, history)
            return await self._on_thread(owner, body, thread, history)
        if body.previous_response_id is not None:
            return await self._chained(owner, body, body.previous_response_id)
        if not body.store:
            return self._stateless(owner, body, None, [])
        thread = Thread(new_id("thread"), owner, instructions=body.instructions)
        return self._new_session(owner, body, thread, [], new_thread=True)

    async def _chained(self, owner: str, body: CreateResponseRequest, previous: str) -> ResponseTarget:
        stored = await self.threads.response(owner, previous)
        if stored is None:
            raise not_found("response", previous, "previous_response_id")
        thread = await self.threads.get(owner, stored.thread)
        history = await self.threads.items(thread.id) if thread else []
        instructions = thread.instructions if thread else None
        if not body.store:
            return self._stateless(owner, body, instructions, history_up_to(stored, history))
        if thread is not None and thread.kind == "chain" and thread.head == stored.id:
            return await self._on_thread(owner, body, thread, history)
        fork = Thread(new_id("thread"), owner, instructions=instructions)
        copied = history_up_to(stored, history)
        target = self._new_session(owner, body, fork, copied, new_thread=True)
        target.copied = copied
        return target

    async def _on_thread(
        self, owner: str, body: CreateResponseRequest, thread: Thread, history: list[Item]
    ) -> ResponseTarget:
        instructions = thread.instructions if body.instructions is None else body.instructions
        record = await self.serving.manager.store.get(thread.session) if thread.session else None
        if (
            record is not None
            and record.owner == owner
            and record.turns == thread.turns
            and instructions == thread.instructions
        ):
            messages = [as_message(i) for i in [*_pending(thread, history), *body.input]]
            return ResponseTarget(owner, thread, thread.session, messages, "delta", body.input, instructions)
        target = self._new_session(owner, body, thread, history)
        target.replaced_session = thread.session
        return target

    def _new_session(
        self,
        owner: str,
        body: CreateResponseRequest,
        thread: Thread,
        history: list[Item],
        new_thread: bool = False,
    ) -> ResponseTarget:
        instructions = thread.instructions if body.instructions is None else body.instructions
        messages = [*_system(instructions), *(as_message(i) for i in [*history, *body.input])]
        sid = f"{thread.id}:{uuid.uuid4().hex[:8]}"
        return ResponseTarget(owner, thread, sid, messages, "auto", body.input, instructions, new_thread)

    def _stateless(
        self, owner: str, body: CreateResponseRequest, instructions: str | None, history: list[Item]
    ) -> ResponseTarget:
        instructions = instructions if body.instructions is None else body.instructions
        messages = [*_system(instructions), *(as_message(i) for i in [*history, *body.input])]
        return ResponseTarget(owner, None, None, messages, "auto", body.input, instructions)

    async def check(self, target: ResponseTarget, plan: TurnPlan) -> None:
        """A continuation must find the session it planned on (it may expire or be deleted meanwhile)."""
        if target.continues and plan.mode != "delta":
            await self.serving.manager.abandon(plan)
            assert target.thread is not None
            raise thread_conflict(target.thread.id)

    async def save(self, target: ResponseTarget, run: ResponseRun) -> None:
        """After the turn's commit: the thread moves on to the new response and its session."""
        thread, plan = target.thread, run.turn.plan
        assert thread is not None and target.session_id is not None
        record = plan.turn.record if plan.turn else None
        response = run.finished()
        output = response["output"]
        thread.session, thread.turns = target.session_id, (record.turns if record else 0) + 1
        thread.committed, thread.head, thread.instructions = output[-1]["id"], run.id, target.instructions
        stored = StoredResponse(run.id, target.owner, thread.id, response, target.input, output)
        items = [*target.copied, *target.input, *output]
        if not await self.threads.write(thread, items, stored, new=target.new_thread):
            raise thread_conflict(thread.id)
        if target.replaced_session:
            await self.drop_session(target.owner, target.replaced_session)

    async def drop_session(self, owner: str, session_id: str) -> None:
        """Free a session no thread points at any more (best effort: it expires with its TTL anyway)."""
        try:
            await self.serving.manager.delete(owner, session_id)
        except Exception as e:
            log.warning("session %s outlived its thread (%s); it expires with its TTL", session_id, e)
