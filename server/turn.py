"""One planned turn on the engine: submit, hand events to the client, then commit or abandon exactly once.

A turn that ends with 'stop' or 'length' is committed before the client sees its last chunk, so a client
that sends its next turn the moment a reply ends always finds the session up to date. A turn whose client
goes away (or that shutdown cuts short) is aborted in the engine at once and abandoned in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from streaming_core.engine import Handle
from streaming_core.engine_process import RESTARTING
from streaming_core.sampler import SamplingParams
from streaming_core.session import TokenEvent

from .conversation.errors import ConversationError
from .conversation.manager import TurnPlan
from .errors import APIError, from_conversation, redis_unavailable
from .redis_client import UNAVAILABLE
from .serving import Serving

log = logging.getLogger(__name__)
_WATCH_S = 0.05
"""How often a client is checked for a disconnect while no event goes out (a poll costs microseconds)."""

_REFUSALS = {
    "session_busy": (409, "the session already has a request in progress"),
    "queue_full": (429, "too many requests are waiting; retry later"),
    RESTARTING: (503, "the engine process stopped and is restarting; retry shortly"),
}


class Turn:
    def __init__(self, serving: Serving, plan: TurnPlan, params: SamplingParams) -> None:
        self.serving, self.plan, self.params = serving, plan, params
        self.handle: Handle | None = None
        self._events: AsyncIterator[TokenEvent] | None = None
        self.tokens: list[TokenEvent] = []
        """Events that carried a token (logprobs are built from them)."""
        self.text = ""
        self.final: TokenEvent | None = None
        self.shutdown = self.client_gone = False
        self.store_error: APIError | None = None
        self.on_commit: Callable[[Turn], Awaitable[None]] | None = None
        """Runs once the turn is committed, before the client sees its end (the Responses API stores its
        objects there); what it raises fails the turn as a failed commit does."""
        self._settled = self._cancelled = False
        self._started = self._last = time.monotonic()

    @property
    def request_id(self) -> str:
        return self.handle.request_id if self.handle else ""

    @property
    def completion_tokens(self) -> int:
        return self.final.completion_tokens if self.final else len(self.tokens)

    async def start(self, request: Request | None = None) -> TokenEvent:
        """Submit and wait for the first event; a refused or failed start raises APIError, the plan abandoned.
        A `request` whose client disconnects meanwhile (a long prefill) aborts the turn within a step."""
        s, plan = self.serving, self.plan
        if plan.rebuild is not None:
            s.metrics.rebuilds.labels(s.model_name).inc()
        s.inflight.add(self)
        loop = asyncio.get_running_loop()
        try:
            self.handle = s.manager.submit(plan, self.params, loop=loop)
            self._events = aiter(self.handle.stream)
            first = await self._first(request)
        except BaseException:
            self.cancel()
            raise
        if first.finish_reason in ("abort", "error"):
            await self._settle(first)
            raise self.failure(first)
        return first

    async def _first(self, request: Request | None) -> TokenEvent:
        assert self._events is not None
        if request is None:
            return await anext(self._events)
        watcher = asyncio.get_running_loop().create_task(self._watch(request))
        try:
            return await anext(self._events)
        finally:
            watcher.cancel()

    def error(self) -> APIError | None:
        """Why the turn did not complete (aborted, failed, or its commit failed); None if it did."""
        if self.final is None:
            return None
        if self.final.finish_reason not in ("stop", "length"):
            return self.failure(self.final)
        return self.store_error

    def failure(self, event: TokenEvent) -> APIError:
        """The error a turn that ended with 'abort' or 'error' reports."""
        if event.error in _REFUSALS:
            status, message = _REFUSALS[event.error]
            return APIError(status, message, code=event.error)
        if self.client_gone:
            return APIError(400, "the client disconnected", code="client_disconnected")
        if self.shutdown or event.finish_reason == "abort":
            return APIError(503, "the server is shutting down", code="shutting_down")
        return APIError(500, f"generation failed: {event.error or 'unknown error'}", code="generation_failed")

    async def events(self, first: TokenEvent) -> AsyncIterator[TokenEvent]:
        """Every event from `first` on; the last one is yielded after the turn is committed or abandoned."""
        assert self._events is not None
        try:
            event: TokenEvent | None = first
            while event is not None:
                self._record(event)
                if event.finish_reason is not None:
                    await self._settle(event)
                    yield event
                    return
                yield event
                event = await anext(self._events)
        finally:
            if not self._settled:
                self.cancel()

    async def collect(self, first: TokenEvent, request: Request) -> None:
        """Consume the whole turn (non-streaming); a client that disconnects meanwhile aborts it."""
        watcher = asyncio.get_running_loop().create_task(self._watch(request))
        try:
            async for _ in self.events(first):
                pass
        finally:
            watcher.cancel()

    async def _watch(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(_WATCH_S)
        log.info("client gone: aborting %s", self.request_id)
        self.client_gone = True
        self.interrupt()

    @property
    def settled(self) -> bool:
        return self._settled

    def interrupt(self, shutdown: bool = False) -> None:
        """Stop generating within one engine step; whoever reads the events sees 'abort' and settles the turn."""
        self.shutdown = self.shutdown or shutdown
        if self.handle is not None and not self._settled:
            self.serving.engine.abort(self.handle.request_id)

    def cancel(self) -> None:
        """Nobody reads the events any more: abort, and settle in the background once the engine confirms."""
        if self._settled or self._cancelled:
            return
        self._cancelled = True
        if self.handle is not None:
            self.serving.engine.abort(self.handle.request_id)
        self.serving.background(self._settle_after_abort())

    async def _settle_after_abort(self) -> None:
        final = self.final
        if self.handle is not None and final is None:
            with contextlib.suppress(asyncio.TimeoutError):
                final = await asyncio.wait_for(_last_event(self.handle), timeout=30)
        await self._settle(final or TokenEvent(None, "", finish_reason="abort"))

    def _record(self, event: TokenEvent) -> None:
        now, m, name = time.monotonic(), self.serving.metrics, self.serving.model_name
        if event.token is not None:
            (m.itl if self.tokens else m.ttft).labels(name).observe(
                now - (self._last if self.tokens else self._started)
            )
            self._last = now
            self.tokens.append(event)
        self.text += event.text
        if event.finish_reason is not None:
            self.final = event
            # prompt tokens the engine copied from a slot holding the same head count as cached too (usage,
            # and the session record that commit writes from the plan)
            self.plan.cached_tokens += event.reused_tokens
            m.reused_tokens.labels(name).inc(event.reused_tokens)

    async def _settle(self, final: TokenEvent) -> None:
        """Commit a completed turn, abandon any other; once, whoever gets here first. Shielded: a client
        that goes away while its finished turn is being committed does not cut the commit short."""
        if self._settled:
            return
        self._settled = True
        self.final = self.final or final
        s = self.serving
        try:
            await asyncio.shield(s.background(self._store(final.finish_reason or "abort")))
        except ConversationError as e:  # the claim was lost to another replica (fencing)
            log.warning("turn %s: %s", self.request_id, e.message)
            self.store_error = from_conversation(e)
        except UNAVAILABLE as e:
            s.redis_failed("commit", e)
            self.store_error = redis_unavailable(e, s.retry_after)
        except Exception as e:
            log.exception("turn %s: the session could not be updated", self.request_id)
            self.store_error = APIError(500, f"the turn could not be saved: {e}", code="session_store_failed")

    async def _store(self, reason: str) -> None:
        try:
            if reason in ("stop", "length"):
                await self.serving.manager.commit(self.plan, self.text, reason)
                if self.on_commit is not None:
                    await self.on_commit(self)
            else:
                await self.serving.manager.abandon(self.plan)
        finally:
            self.serving.inflight.discard(self)
            self.serving.metrics.request_done(reason, time.monotonic() - self._started)


async def _last_event(handle: Handle) -> TokenEvent | None:
    last = None
    async for event in handle.stream:
        last = event
    return last
