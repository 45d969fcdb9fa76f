"""The engine: sessions in, tokens out. One loop thread; each step is schedule, run, postprocess.

Thread model: callers (the HTTP server's event loop, the CLI) reach the engine only through
`submit`, `abort` and `call`; what they ask is queued and applied by the loop thread between steps,
so the scheduler and the sessions are only ever touched by one thread. Without a started loop thread
the same calls run inline and `run_until_done` drives the steps (tests, benchmarks). The thread itself
and its stop logic are in engine_loop.py; loading a model into an engine is `loader.build_engine`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .batch import StepOutput
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .engine_loop import EngineLoop
from .kv_pool import KVPool
from .kv_tiers import KVTiers, TierCounts
from .models import DecoderModel
from .positions import ring_index
from .runner import ModelRunner
from .sampler import RequestSampler, SamplingParams, sample
from .scheduler import QueueFull, Scheduled, Scheduler, SessionBusy
from .session import KVLocation, Rebuild, Request, RequestStream, SessionStats, TokenEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def check_turn(
    tokens: list[int], sink_tokens: int | None, rebuild: Rebuild | None, capacity: int, vocab_size: int
) -> None:
    """What `submit` refuses at once (ValueError): an empty turn, a sink count the slot cannot hold, and
    ids the model cannot embed (e.g. a session record written under another model's vocabulary)."""
    if not tokens:
        raise ValueError("a turn needs at least one new token")
    if sink_tokens is not None and not 0 <= sink_tokens < capacity:
        raise ValueError(f"sink_tokens must be in [0, {capacity - 1}], got {sink_tokens}")
    for toks in (tokens, *((rebuild.sinks, rebuild.tail) if rebuild else ())):
        bad = next((t for t in toks if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"token ids must be in [0, {vocab_size}) for this model, got {bad}")


@dataclass
class StepStats:
    """One step and the engine after it: the `on_step` hook's argument (plain numbers, so that an engine in
    another process can send it along with the step's events)."""

    rows: int
    decode_only: bool
    """Every row was a decode row (no prefill chunk in the step)."""
    prefilled: int
    generated: int
    running: int
    waiting: int
    busy_slots: int
    num_slots: int
    sessions: int
    offloads: int
    """Slots given up so far (monotonic)."""
    tiers: TierCounts


@dataclass(frozen=True)
class Handle:
    """What `submit` returns: the request id (for `abort`) and its event stream."""

    request_id: str
    stream: RequestStream


class Engine:
    def __init__(
        self,
        model: DecoderModel,
        tokenizer: Any,
        config: EngineConfig,
        eos_token_ids: Iterable[int] = (),
        kv_dir: Path | None = None,
    ) -> None:
        """`kv_dir`: where the disk KV tier keeps its files (wiped here: no session outlives the engine);
        None: no disk tier."""
        config.cache.check_context(model.max_context)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        kv_dtype = model.default_kv_dtype() if config.kv_dtype == "auto" else getattr(torch, config.kv_dtype)
        self.pool = KVPool(config.cache, model.kv_shape, model.lm_head.dtype, model.lm_head.device, kv_dtype)
        self.tiers = KVTiers(self.pool, kv_dir)
        self.runner = ModelRunner(model, self.pool, self.tiers)
        self.scheduler = Scheduler(config.cache, config.max_batch_tokens, config.max_waiting)
        self.scheduler.fetch = self.tiers.claim
        self.eos = set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.loop = EngineLoop(lambda: self.scheduler.has_work, self.safe_step, self._abort_all)
        self.steps = 0
        self.on_step: Callable[[StepStats], None] | None = None
        """Hook for metrics, called on the loop thread after every step."""

    # -- public API (any thread) -------------------------------------------------------------------
    def submit(
        self,
        session_id: str | None,
        tokens: list[int],
        params: SamplingParams | None,
        loop: asyncio.AbstractEventLoop | None = None,
        rebuild: Rebuild | None = None,
        sink_tokens: int | None = None,
        request_id: str | None = None,
        stream: RequestStream | None = None,
    ) -> Handle:
        """Queue a turn: prefill `tokens` into the session, then generate under `params` (None: prefill only).

        A new session id opens a session; None opens an ephemeral one, dropped after the turn. A full
        queue or a busy session ends the stream at once with an error event ('queue_full', 'session_busy').
        `rebuild` recreates a session whose KV is gone (another process, a restart) from its sinks and
        tail before the turn's tokens; a session the engine still holds ignores it. `sink_tokens` sets a
        new session's sink count (a pinned system prompt), taken from the window; ignored afterwards.
        `request_id` and `stream` are chosen by the caller only when it relays the turn (engine_process.py).
        """
        check_turn(tokens, sink_tokens, rebuild, self.config.cache.capacity, self.model.vocab_size)
        stream = stream or RequestStream(loop)
        request_id = request_id or new_request_id()
        detok = None if params is None else IncrementalDetokenizer(self.tokenizer, params.stop)

        def add() -> None:
            if self.loop.stopping:
                stream.put(TokenEvent(None, "", finish_reason="abort"))
                return
            sid = session_id or f"tmp-{request_id}"
            session = self.scheduler.session(sid, ephemeral=session_id is None, sink_tokens=sink_tokens)
            req = Request(session, list(tokens), params, None, stream, detok, id=request_id)
            held = [*session.sinks, *session.tail]
            fresh = session.tokens_seen == 0 and session.request is None
            if rebuild is not None and fresh:
                held = [*rebuild.sinks, *rebuild.tail]
                req.prompt = [*held, *tokens]
                req.resume = (len(rebuild.sinks), rebuild.tokens_seen - len(rebuild.tail))
                req.advance(0)  # without sinks the jump in stream index comes before the first chunk
            if params is not None:
                # the penalties look at what the cache will hold, as for a stateless request of the same stream
                req.sampler = RequestSampler(params, [*held, *tokens], self.model.vocab_size)
            try:
                self.scheduler.add(req)
            except (QueueFull, SessionBusy) as e:
                if fresh:
                    self.scheduler.close(sid)
                code = "queue_full" if isinstance(e, QueueFull) else "session_busy"
                stream.put(TokenEvent(None, "", finish_reason="error", error=code))
                return
            self.requests[request_id] = req

        self.call(add)
        return Handle(request_id, stream)

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); it ends within one step and its session keeps what was consumed."""

        def cancel() -> None:
            req = self.requests.get(request_id)
            if req is not None:
                self._finish(req, "abort")

        self.call(cancel)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the loop thread between steps (inline when no loop thread runs)."""
        return self.loop.call(fn)

    def read_tier_counts(self) -> Future[TierCounts]:
        """`tier_counts` as the loop thread sees it between steps."""
        return self.call(self.tier_counts)

    def holds(self, session_ids: list[str]) -> Future[dict[str, bool]]:
        """Which of the sessions the engine holds (in any tier)."""
        sessions = self.scheduler.sessions
        return self.call(lambda: {sid: sid in sessions for sid in session_ids})

    def stats(self, session_id: str) -> SessionStats | None:
        return self.call(lambda: self._stats(session_id)).result()

    def session_state(self, session_id: str) -> Rebuild | None:
        """What a rebuild of this session would start from (None if unknown); persisted per turn by the server."""

        def read() -> Rebuild | None:
            s = self.scheduler.sessions.get(session_id)
            if s is None:
                return None
            return Rebuild(list(s.sinks), list(s.tail), s.tokens_seen)

        return self.call(read).result()

    def close_session(self, session_id: str) -> bool:
        """Forget an idle session and free its KV; False if unknown or busy."""

        def close() -> bool:
            s = self.scheduler.sessions.get(session_id)
            if s is None or s.request is not None:
                return False
            for sid in self.scheduler.close(session_id):
                self.tiers.discard(sid)
            return True

        return self.call(close).result()

    def truncate(self, session_id: str, n: int) -> bool:
        """Drop an idle resident session's last n consumed window tokens (n <= its tail); False if not possible.

        Used when a turn's last tokens differ from the conversation's canonical tokenization. Tokens
        that those n had already evicted do not come back: the window holds n fewer until refilled.
        """

        def cut() -> bool:
            s = self.scheduler.sessions.get(session_id)
            if s is None or s.request is not None or s.slot is None or not 0 <= n <= len(s.tail):
                return False
            dropped = torch.arange(s.tokens_seen - n, s.tokens_seen)
            self.runner.forget(s.slot, ring_index(dropped, s.sink_tokens, s.window))
            for _ in range(n):
                s.tail.pop()
            s.tokens_seen -= n
            self.scheduler.truncated(s)
            return True

        return self.call(cut).result()

    def offload(self, session_id: str) -> None:
        """Move an idle session's KV down the tiers now and wait for the copy (otherwise it happens LRU,
        off the hot path, when slots run out)."""

        def move() -> None:
            s = self.scheduler.sessions[session_id]
            if s.request is not None or s.slot is None:
                raise ValueError(f"session {session_id!r} is busy or not resident")
            plan = self.scheduler.evict(s)
            self.runner.run(plan)
            self.tiers.flush()
            self._sync_tiers()

        self.call(move).result()

    # -- loop (engine_loop.py) --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.loop.running

    @property
    def available(self) -> bool:
        """Takes turns (until `stop`)."""
        return not self.loop.stopping

    def start(self) -> None:
        self.loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step: in-flight requests end with an 'abort' event, calls still queued
        are run (a submit is refused with 'abort'), and later calls run inline."""
        self.loop.stop(timeout)

    def close(self) -> None:
        """After `stop`: the disk tier's files go (no session outlives the engine)."""
        self.tiers.close()

    def _abort_all(self) -> None:
        for req in list(self.requests.values()):
            self._finish(req, "abort")

    def safe_step(self) -> None:
        """One step; a failure ends the running requests with an error instead of raising."""
        try:
            self.step()
        except Exception as e:  # a failed step must not kill the loop: fail its requests instead
            log.exception("engine step failed")
            self._fail_running(f"engine step failed: {e}")

    def _fail_running(self, error: str) -> None:
        """End every running request with an error and forget its session: a failed step may have written
        KV it never accounted for, so none of it is reused (nor shared by prefix reuse); the next turn rebuilds
        from the record."""
        self.scheduler.prefixes.clear()
        for req in list(self.scheduler.running):
            self._finish(req, "error", error=error)
            self.scheduler.close(req.session.id)
            self.tiers.discard(req.session.id)

    def run_until_done(self, *handles: Handle) -> None:
        """Drive steps inline until the given requests have ended (no loop thread)."""
        assert not self.running, "the loop thread is running"
        while not all(h.stream.done.is_set() for h in handles):
            if not self.scheduler.has_work:
                raise RuntimeError("requests pending but nothing scheduled")
            self.step()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> None:
        self._sync_tiers()
        plan, work = self.scheduler.schedule()
        output = self.runner.run(plan)
        self._postprocess(work, output)
        if not plan.chunks and self.scheduler.draining:  # nothing runs until a slot's copy is done
            self.tiers.wait(0.05)

    def _sync_tiers(self) -> None:
        """Slots whose copy is done go back to the pool; sessions the tiers dropped are forgotten."""
        for slot in self.tiers.finished_slots():
            self.scheduler.release(slot)
        for sid in self.tiers.dropped():
            self.scheduler.forget(sid)

    def tier_counts(self) -> TierCounts:
        """Sessions and KV bytes per tier (slot, host, disk) and the moves between them (loop thread)."""
        counts = self.tiers.snapshot_counts()
        resident = sum(1 for s in self.scheduler.sessions.values() if s.slot is not None)
        counts.slot_sessions, counts.slot_bytes = resident, resident * self.tiers.entry_bytes
        return counts

    def _postprocess(self, work: list[Scheduled], output: StepOutput) -> None:
        to_sample: list[tuple[Request, torch.Tensor]] = []
        for i, w in enumerate(work):
            req = w.request
            self.scheduler.consume(req.session, w.tokens)
            if w.decode:
                req.pending = None
            else:
                req.advance(len(w.tokens))
            if w.sample and req.params is None:
                self._finish(req, "stop")
            elif w.sample:
                to_sample.append((req, output.logits[i]))
        if to_sample:
            logits = torch.cat([lg for _, lg in to_sample])  # [B, V]
            samplers = [r.sampler for r, _ in to_sample]
            assert all(s is not None for s in samplers)
            fused = self.model.fused  # greedy picks on the compiled kernels where the model has them
            argmax = fused.argmax_rows if fused is not None else None
            picked = sample(logits, samplers, argmax)  # type: ignore[arg-type]
            for (req, _), tok in zip(to_sample, picked, strict=True):
                self._emit(req, tok.token, tok.logprob, tok.top_logprobs)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.step_stats(work))

    def step_stats(self, work: list[Scheduled]) -> StepStats:
        s = self.scheduler
        return StepStats(
            rows=len(work),
            decode_only=all(w.decode for w in work),
            prefilled=sum(len(w.tokens) for w in work if not w.decode),
            generated=sum(1 for w in work if w.sample and w.request.params is not None),
            running=len(s.running),
            waiting=len(s.waiting),
            busy_slots=s.cache.num_slots - len(s.free_slots),
            num_slots=s.cache.num_slots,
            sessions=len(s.sessions),
            offloads=s.offloads,
            tiers=self.tier_counts(),
        )

    def _emit(self, req: Request, token: int, logprob: float | None, top: list[tuple[int, float]]) -> None:
        params, detok = req.params, req.detok
        assert params is not None and detok is not None
        req.generated.append(token)
        if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
            self._finish(req, "stop", token=token, text=detok.flush(), logprob=logprob, top=top)
            return
        text = detok.add(token)
        if detok.stopped:
            self._finish(req, "stop", token=token, text=text, logprob=logprob, top=top)
        elif len(req.generated) >= params.max_tokens:
            self._finish(req, "length", token=token, text=text + detok.flush(), logprob=logprob, top=top)
        else:
            req.pending = token
            req.stream.put(TokenEvent(token, text, logprob, top))

    def _finish(
        self,
        req: Request,
        reason: str,
        token: int | None = None,
        text: str = "",
        logprob: float | None = None,
        top: list[tuple[int, float]] | None = None,
        error: str | None = None,
    ) -> None:
        if self.requests.pop(req.id, None) is None and req.session.request is not req:
            return
        if reason == "abort" and req.detok is not None:
            text += req.detok.flush()
        for sid in self.scheduler.finish(req):
            self.tiers.discard(sid)
        event = TokenEvent(token, text, logprob, top or [], finish_reason=reason, error=error)
        event.prompt_tokens, event.completion_tokens = len(req.prompt), len(req.generated)
        event.reused_tokens = req.reused
        req.stream.put(event)

    def _stats(self, session_id: str) -> SessionStats | None:
        s = self.scheduler.sessions.get(session_id)
        if s is None:
            return None
        where = s.location.value
        if s.location is KVLocation.HOST:
            where = self.tiers.where(s.id) or where
        return SessionStats(
            s.id, s.tokens_seen, s.cache_tokens, s.evicted, where, s.slot, s.request is not None
        )
