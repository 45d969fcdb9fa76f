"""Bookkeeping objects the scheduler moves around: sessions, requests, and the event stream a request feeds.

A `Session` is one conversation's stream: tokens consumed into its KV, the sinks and the recent tail
(enough to rebuild the KV from scratch), and where the KV lives (a pool slot, host memory, or nowhere).
A `Request` is one turn on a session: new tokens to prefill, then tokens to generate.
No tensors here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import Enum

from .detokenizer import IncrementalDetokenizer
from .sampler import RequestSampler, SamplingParams

_request_ids = itertools.count()


class KVLocation(Enum):
    NONE = "none"  # nothing consumed yet, or the KV was dropped: rebuild from sinks + tail
    SLOT = "slot"  # resident in a device pool slot
    HOST = "host"  # offloaded to host memory


@dataclass
class Session:
    id: str
    sink_tokens: int
    window: int
    tokens_seen: int = 0
    """Tokens consumed into the KV over the whole stream (evicted ones included)."""
    sinks: list[int] = field(default_factory=list)
    tail: deque[int] = field(default_factory=deque)
    """The last `window` consumed tokens: with `sinks`, what a rebuild re-prefills."""
    slot: int | None = None
    location: KVLocation = KVLocation.NONE
    request: Request | None = None
    ephemeral: bool = False
    """Dropped as soon as its request ends (stateless requests)."""
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tail = deque(self.tail, maxlen=self.window)

    @property
    def cache_tokens(self) -> int:
        return min(self.tokens_seen, self.sink_tokens + self.window)

    @property
    def evicted(self) -> int:
        return self.tokens_seen - self.cache_tokens

    def consume(self, tokens: list[int] | tuple[int, ...]) -> None:
        """Record tokens whose KV has just been written."""
        need = max(0, self.sink_tokens - len(self.sinks))
        self.sinks.extend(tokens[:need])
        self.tail.extend(tokens[need:])
        self.tokens_seen += len(tokens)


@dataclass(frozen=True)
class Rebuild:
    """What a session's KV is recomputed from: its sinks, its recent tail, and how many tokens it had seen.

    While nothing was evicted (tokens_seen <= capacity) the rebuilt KV is exact; past that, the window is
    recomputed without the evicted context that originally preceded it (StreamingLLM keeps no more).
    """

    sinks: list[int]
    tail: list[int]
    tokens_seen: int

    def __post_init__(self) -> None:
        if self.tokens_seen < len(self.sinks) + len(self.tail):
            raise ValueError("tokens_seen is smaller than the sinks plus the tail")


@dataclass
class SessionStats:
    id: str
    tokens_seen: int
    cache_tokens: int
    evicted: int
    location: str
    slot: int | None
    busy: bool


@dataclass
class TokenEvent:
    """One generated token as the client sees it; the last event of a request carries finish_reason."""

    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or 'error'."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_tokens: int = 0
    """Prompt tokens whose KV was copied from a slot holding the same head (prefix reuse), not computed."""
    error: str | None = None


class RequestStream:
    """Events of one request, put by the engine thread, read sync (iteration) or async (`async for`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._async: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.done = threading.Event()

    def put(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.done.set()
        if self._loop is not None and self._async is not None:
            with contextlib.suppress(RuntimeError):  # the client's loop is closed: nobody listens any more
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._sync.put(event)

    def put_from_loop(self, event: TokenEvent) -> None:
        """`put` from a callback already running on the reader's event loop (no thread-safe wake-up)."""
        if self._async is None or self._loop is None:
            self.put(event)
            return
        if event.finish_reason is not None:
            self.done.set()
        if not self._loop.is_closed():
            self._async.put_nowait(event)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._sync.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        assert self._async is not None, "create the stream with the event loop to read it asynchronously"
        while True:
            event = await self._async.get()
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class Request:
    session: Session
    prompt: list[int]
    params: SamplingParams | None
    """None: prefill only (ingest tokens into the session, generate nothing)."""
    sampler: RequestSampler | None
    stream: RequestStream
    detok: IncrementalDetokenizer | None
    id: str = field(default_factory=lambda: f"req-{next(_request_ids)}")
    prefilled: int = 0
    pending: int | None = None
    """Last sampled token: it is fed (and enters the KV) only if generation goes on."""
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    resume: tuple[int, int] | None = None
    """(prompt index, stream index): a rebuild re-prefills the sinks, then jumps to the tail's stream index."""
    reused: int = 0
    """Prompt tokens whose KV was copied from another slot's leading run instead of prefilled."""

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.prefilled

    def next_chunk(self, limit: int) -> int:
        """Prompt tokens for the next chunk: a chunk never crosses the rebuild's jump in stream index."""
        n = min(self.prefill_left, limit)
        if self.resume is not None and self.prefilled < self.resume[0]:
            n = min(n, self.resume[0] - self.prefilled)
        return n

    def advance(self, n: int) -> None:
        """n prompt tokens were consumed."""
        self.prefilled += n
        if self.resume is not None and self.prefilled == self.resume[0]:
            self.session.tokens_seen = self.resume[1]
