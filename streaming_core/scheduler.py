"""Continuous batching over sessions: plain-Python bookkeeping, no tensors.

Every step decodes one token for each running request that has finished its prompt and fills the rest
of the token budget with prompt chunks. Sessions own pool slots while they hold KV; a request whose
session has no slot waits until one is free or an idle session is offloaded (least recently used).
An offloaded slot is copied down off the hot path (kv_tiers.py): it stays `draining`, given to no one,
until `release` hands it back; requests waiting for slots wait for it meanwhile, the running batch does not.

Prefix reuse: while nothing is evicted, stream token t sits at entry t, and its KV depends only on tokens
0..t. So the scheduler remembers, per slot (held, free or draining), the tokens of that leading run, and a
new session whose prompt starts with some of them gets their KV copied (or keeps the slot, when it is free)
instead of prefilling them: what a chunked prefill whose first chunk ended there would have written. At
least the prompt's last token is always computed (its logits are sampled). A slot's run is cut back to its
sinks when the ring first overwrites an entry, forgotten when the slot is cleared or restored, and every run
is forgotten after a failed step.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .batch import BatchPlan, SeqChunk
from .config import CacheConfig
from .session import KVLocation, Request, Session


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; the server answers 429."""


class SessionBusy(RuntimeError):
    """A session takes one request at a time; the server answers 409."""


@dataclass(frozen=True)
class Scheduled:
    """What one chunk of the plan was for, so that its output reaches the right request."""

    request: Request
    tokens: tuple[int, ...]
    decode: bool
    sample: bool


class Scheduler:
    def __init__(self, cache: CacheConfig, max_batch_tokens: int, max_waiting: int) -> None:
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_waiting = max_waiting
        self.sessions: dict[str, Session] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(cache.num_slots))
        """Slots no session holds; the one handed out is the one with the shortest leading run."""
        self.prefixes: dict[int, list[int]] = {}
        """Per slot: the tokens at entries 0.. as a fresh stream wrote them (see the module docstring)."""
        self.reused_tokens = 0
        """Prompt tokens copied from a slot's leading run instead of prefilled, over the engine's life."""
        self.draining: set[int] = set()
        """Slots of offloaded sessions whose copy is still running."""
        self.offloads = 0
        self.fetch: Callable[[str], bool] = lambda session_id: True
        """Readies an offloaded session's KV for restore in this step; False: it is gone (rebuild instead)."""

    # -- queues ----------------------------------------------------------------------------------
    def session(self, session_id: str, ephemeral: bool = False, sink_tokens: int | None = None) -> Session:
        """The session of that id, created on first use; `sink_tokens` (fixed while it holds no tokens)
        widens its sinks, e.g. to pin a system prompt, at the window's expense."""
        s = self.sessions.get(session_id)
        if s is None or (s.tokens_seen == 0 and s.request is None and sink_tokens is not None):
            sinks = self.cache.sink_tokens if sink_tokens is None else sink_tokens
            if not 0 <= sinks < self.cache.capacity:
                raise ValueError(f"sink_tokens must be in [0, {self.cache.capacity - 1}], got {sinks}")
            s = Session(session_id, sinks, self.cache.capacity - sinks, ephemeral=ephemeral)
            self.sessions[session_id] = s
        return s

    def add(self, request: Request) -> None:
        if request.session.request is not None:
            raise SessionBusy(f"session {request.session.id!r} already has a request in progress")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        request.session.request = request
        self.waiting.append(request)

    def finish(self, request: Request) -> list[str]:
        """Take a request out of the queues; returns session ids whose tier copies are now unused."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        s = request.session
        s.request = None
        s.last_used = time.monotonic()
        return self.close(s.id) if s.ephemeral else []

    def close(self, session_id: str) -> list[str]:
        """Forget a session (it must be idle); its slot goes back to the pool."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return []
        if s.slot is not None:
            self.free_slots.append(s.slot)
        return [s.id] if s.location is KVLocation.HOST else []

    def release(self, slot: int) -> None:
        """An offloaded slot's copy is done: it can be handed out again."""
        self.draining.discard(slot)
        self.free_slots.append(slot)

    def forget(self, session_id: str) -> None:
        """The tiers dropped this session's KV: forget it unless a turn has claimed it meanwhile (the server
        rebuilds it from Redis on its next turn)."""
        s = self.sessions.get(session_id)
        if s is not None and s.request is None and s.location is KVLocation.HOST:
            del self.sessions[session_id]

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> tuple[BatchPlan, list[Scheduled]]:
        offload: list[tuple[str, int]] = []
        restore: list[tuple[str, int]] = []
        clear: list[int] = []
        share: list[tuple[int, int, int]] = []
        self._admit(offload, restore, clear, share)
        budget = self.max_batch_tokens
        work: list[Scheduled] = []
        for r in self.running:
            if r.pending is not None and budget > 0:
                work.append(Scheduled(r, (r.pending,), decode=True, sample=True))
                budget -= 1
        for r in sorted(self.running, key=lambda r: r.arrived):
            if r.prefill_left > 0 and budget > 0:
                n = r.next_chunk(min(self.cache.prefill_chunk, budget))
                done = n == r.prefill_left
                work.append(Scheduled(r, tuple(r.prompt[r.prefilled : r.prefilled + n]), False, done))
                budget -= n
        chunks = tuple(self._chunk(w) for w in work)
        plan = BatchPlan(chunks, tuple(offload), tuple(restore), tuple(clear), share=tuple(share))
        return plan, work

    def _chunk(self, w: Scheduled) -> SeqChunk:
        s = w.request.session
        assert s.slot is not None, "running requests hold a slot"
        sinks = None if s.sink_tokens == self.cache.sink_tokens else s.sink_tokens
        return SeqChunk(s.slot, s.tokens_seen, w.tokens, "last" if w.sample else "none", sinks)

    def _admit(
        self,
        offload: list[tuple[str, int]],
        restore: list[tuple[str, int]],
        clear: list[int],
        share: list[tuple[int, int, int]],
    ) -> None:
        """Move waiting requests to running while slots can be found, in arrival order."""
        while self.waiting:
            r = self.waiting[0]
            s = r.session
            if s.slot is None:
                if not self.free_slots:
                    self._offload_for_waiting(offload)
                    return
                if s.location is KVLocation.HOST and self.fetch(s.id):
                    s.slot = self._take_slot()
                    self.prefixes.pop(s.slot, None)
                    restore.append((s.id, s.slot))
                else:
                    if s.location is KVLocation.HOST:
                        _rebuild_in_place(r)
                    self._place_fresh(r, clear, share)
                s.location = KVLocation.SLOT
            self.waiting.popleft()
            self.running.append(r)

    def _take_slot(self) -> int:
        """A free slot, keeping long leading runs for the prompts that may share them."""
        slot = min(self.free_slots, key=lambda i: (len(self.prefixes.get(i, ())), i))
        self.free_slots.remove(slot)
        return slot

    def _place_fresh(self, r: Request, clear: list[int], share: list[tuple[int, int, int]]) -> None:
        """Give a session with no KV a slot: a free one cleared, or one starting with the longest leading
        run the prompt shares (kept in place when that slot is free, else copied)."""
        s = r.session
        source, n = self._longest_shared_run(r)
        if n == 0:
            s.slot = self._take_slot()
            clear.append(s.slot)
            self.prefixes[s.slot] = []
            return
        if source in self.free_slots:
            self.free_slots.remove(source)
            s.slot = source
        else:
            s.slot = self._take_slot()
        share.append((source, s.slot, n))
        self.prefixes[s.slot] = self.prefixes[source][:n]
        s.consume(r.prompt[:n])
        r.advance(n)
        r.reused = n
        self.reused_tokens += n

    def _longest_shared_run(self, r: Request) -> tuple[int, int]:
        """(slot, n): the slot whose leading run shares the most tokens with the prompt's head; a free slot
        among equals (nothing to copy). n is 0 when none does or the session cannot start from one."""
        if not self.cache.prefix_reuse or r.session.tokens_seen != 0:
            return -1, 0
        limit = min(len(r.prompt) - 1, self.cache.capacity)
        if r.resume is not None and r.resume[0] != r.resume[1]:  # a rebuild's stream jumps after its sinks
            limit = min(limit, r.resume[0])
        best, n = -1, 0
        for slot, run in self.prefixes.items():
            m = common_prefix(run, r.prompt, limit)
            if m > n or (m == n > 0 and slot in self.free_slots and best not in self.free_slots):
                best, n = slot, m
        return best, n

    def consume(self, s: Session, tokens: tuple[int, ...]) -> None:
        """Record tokens whose KV has just been written into the session's slot."""
        run = self.prefixes.get(s.slot) if s.slot is not None else None
        if run is not None:
            if len(run) == s.tokens_seen and s.tokens_seen + len(tokens) <= self.cache.capacity:
                run.extend(tokens)
            else:  # a jump in stream index, or the ring overwrote an entry: only the sinks stay put
                del run[s.sink_tokens :]
        s.consume(tokens)

    def truncated(self, s: Session) -> None:
        """The session's last consumed tokens were forgotten (tokens_seen already lowered)."""
        run = self.prefixes.get(s.slot) if s.slot is not None else None
        if run is not None:
            del run[s.tokens_seen :]

    def evict(self, session: Session) -> BatchPlan:
        """Plan to move an idle resident session's KV down the tiers; its slot drains until `release`."""
        assert session.slot is not None and session.request is None
        plan = BatchPlan((), offload=((session.id, session.slot),))
        self._offload(session, [])
        return plan

    def _offload_for_waiting(self, offload: list[tuple[str, int]]) -> None:
        """Start offloading idle sessions, least recently used first, for the waiting sessions that need a
        slot beyond those the draining slots will serve."""
        need = len({r.session.id for r in self.waiting if r.session.slot is None}) - len(self.draining)
        if need <= 0:
            return
        idle = [s for s in self.sessions.values() if s.slot is not None and s.request is None]
        for victim in heapq.nsmallest(need, idle, key=lambda s: s.last_used):
            self._offload(victim, offload)

    def _offload(self, victim: Session, offload: list[tuple[str, int]]) -> None:
        slot = victim.slot
        assert slot is not None
        offload.append((victim.id, slot))
        self.draining.add(slot)
        victim.slot, victim.location = None, KVLocation.HOST
        self.offloads += 1


def common_prefix(a: Sequence[Any], b: Sequence[Any], limit: int | None = None) -> int:
    """Length of the common prefix of two sequences (token lists, strings), at most `limit`. Sequences of
    one type are compared a block at a time, as slices, so that long equal heads are compared in C (a list
    slice never equals a tuple's: other pairs go element by element)."""
    end = min(len(a), len(b)) if limit is None else min(limit, len(a), len(b))
    n, block = 0, 64 if type(a) is type(b) else end + 1
    while n + block <= end and a[n : n + block] == b[n : n + block]:
        n += block
    while n < end and a[n] == b[n]:
        n += 1
    return n


def _rebuild_in_place(r: Request) -> None:
    """The session's offloaded KV is gone (dropped, unreadable): re-prefill its own sinks and tail first,
    as a rebuild from the server's record would."""
    s = r.session
    sinks, tail, seen = list(s.sinks), list(s.tail), s.tokens_seen
    r.prompt = [*sinks, *tail, *r.prompt]
    if sinks:  # the jump to the tail's stream index happens once the sinks are in
        r.resume = (len(sinks), seen - len(tail))
    s.sinks.clear()
    s.tail.clear()
    s.tokens_seen = 0 if sinks else seen - len(tail)
