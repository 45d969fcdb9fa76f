"""The engine in a process of its own, behind the same calls as an `Engine` (`engine_api.EngineAPI`).

Why: in one process the engine thread and the HTTP event loop share one GIL, and the compiled kernels keep
it while they run. Every time the event loop wakes for a token (the token's callback, the socket write) it
waits for the step to let go of the GIL, and the step then waits for it back: one HTTP stream ran at 55% of
the engine's single-session rate (docs/perf-notes.md). Here the child process steps the engine on its main
thread with nobody to share its GIL with; the parent only moves messages.

Protocol, one duplex pipe of pickled tuples:
- parent -> child: ("submit", request id, session id, tokens, params, rebuild, sink tokens),
  ("abort", request id), ("call", call id, name, args), ("stop",).
- child -> parent: ("ready", tokenizer, eos ids, engine config, vocab size) or ("failed", reason) once;
  then ("events", [(request id, TokenEvent)], [StepStats]) after each step or batch of commands, and
  ("result", call id, ok, value or exception) for each call.
The child reads commands between steps, so a command waits at most one step, as with the loop thread.

Faults: a child that dies (killed, out of memory, a crash) ends every request in flight with the error
'engine_restarting' and fails pending calls with `EngineUnavailable`; the parent starts a new child at once
(retrying with a growing pause if that fails). Its sessions' KV is gone, so the next turn of each rebuilds
from its record, as after a restart of the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from .config import EngineConfig
from .engine import Engine, Handle, StepStats, check_turn, new_request_id
from .kv_tiers import TierCounts
from .sampler import SamplingParams
from .session import Rebuild, RequestStream, SessionStats, TokenEvent

log = logging.getLogger(__name__)

RESTARTING = "engine_restarting"
"""The error code of requests that were running when the engine process died."""


class EngineUnavailable(RuntimeError):
    """The engine process is not there (it died and is restarting, or it was stopped)."""


# -- the child ---------------------------------------------------------------------------------------


class _Relay(RequestStream):
    """A request's stream in the child: its events go to the outbox, which goes to the parent."""

    def __init__(self, request_id: str, outbox: list[tuple[str, TokenEvent]]) -> None:
        super().__init__(None)
        self.request_id, self.outbox = request_id, outbox

    def put(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.done.set()
        self.outbox.append((self.request_id, event))


_CALLS: dict[str, Callable[..., Any]] = {
    "stats": Engine.stats,
    "session_state": Engine.session_state,
    "close_session": Engine.close_session,
    "truncate": Engine.truncate,
    "offload": Engine.offload,
    "tier_counts": Engine.tier_counts,
    "holds": lambda engine, session_ids: engine.holds(session_ids).result(),
}
"""What the parent may call, run inline between steps (the child starts no loop thread)."""


class _Host:
    """The child's loop: commands between steps, steps while there is work, events after each."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.outbox: list[tuple[str, TokenEvent]] = []
        self.steps: list[StepStats] = []
        self.stopped = False
        engine.on_step = self.steps.append

    def run(self) -> None:
        engine = self.engine
        try:
            while not self.stopped:
                if self.conn.poll(0 if engine.scheduler.has_work else None):
                    self._handle(self.conn.recv())
                    while not self.stopped and self.conn.poll(0):
                        self._handle(self.conn.recv())
                if not self.stopped and engine.scheduler.has_work:
                    engine.safe_step()
                self._flush()
        except (EOFError, OSError):  # the parent is gone: nobody to answer
            return
        finally:
            engine.stop()  # no loop thread: ends what is in flight with 'abort', inline
            engine.close()
        self._flush()

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "submit":
            _, request_id, session_id, tokens, params, rebuild, sink_tokens = msg
            stream = _Relay(request_id, self.outbox)
            try:
                self.engine.submit(
                    session_id,
                    tokens,
                    params,
                    None,
                    rebuild,
                    sink_tokens,
                    request_id=request_id,
                    stream=stream,
                )
            except ValueError as e:  # the parent checks first; a refusal here still ends the stream
                stream.put(TokenEvent(None, "", finish_reason="error", error=str(e)))
        elif kind == "abort":
            self.engine.abort(msg[1])
        elif kind == "call":
            _, call_id, name, args = msg
            try:
                reply: tuple[Any, ...] = ("result", call_id, True, _CALLS[name](self.engine, *args))
            except Exception as e:
                reply = ("result", call_id, False, e)
            self._flush()  # events before the answer, in the order the engine made them
            try:
                self.conn.send(reply)
            except Exception as e:  # an exception that does not pickle
                self.conn.send(("result", call_id, False, RuntimeError(f"{type(e).__name__}: {e}")))
        elif kind == "stop":
            self.stopped = True

    def _flush(self) -> None:
        if self.outbox or self.steps:
            self.conn.send(("events", self.outbox, self.steps))  # pickled here: the lists can be reused
            self.outbox.clear()
            self.steps.clear()


def _child_main(
    conn: Connection, build: Callable[..., Engine], args: tuple[Any, ...], log_level: int
) -> None:
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine process] %(message)s"
    )
    try:
        engine = build(*args)
    except BaseException as e:
        log.exception("the engine process could not load its engine")
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", engine.tokenizer, engine.eos, engine.config, engine.model.vocab_size))
    _Host(engine, conn).run()


# -- the parent --------------------------------------------------------------------------------------


class EngineProcess:
    """An engine built by `build(*args)` (a picklable function: `loader.build_engine` for the server) in a
    child process. `launch` starts it and waits until it is loaded; the calls are `Engine`'s."""

    tokenizer: Any
    eos: set[int]
    config: EngineConfig
    vocab_size: int
    """These four come from the child's engine once it is loaded."""

    def __init__(self, build: Callable[..., Engine], *args: Any, start_timeout: float = 900.0) -> None:
        self._build, self._args, self.start_timeout = build, args, start_timeout
        self.on_step: Callable[[StepStats], None] | None = None
        self.restarts = 0
        """Children started after the first one died."""
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._call_ids = itertools.count()
        self._stopping = False
        self._gone = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- start and stop --------------------------------------------------------------------------
    def launch(self, loop: asyncio.AbstractEventLoop | None = None) -> EngineProcess:
        """Start the child and wait for its engine (minutes for a first model conversion); raises if it fails.

        With `loop` (an event loop running in another thread, as the server's), the child's messages are
        read on that loop, which wakes once per message and hands events straight to their streams; a
        relay thread in between measured 0.37 ms of CPU a token more, on two cores that the engine's step
        also needs. Without one, a relay thread reads them (streams read synchronously)."""
        self._loop = loop
        self._spawn()
        return self

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fork would copy this process's threads' locks
        parent, child = ctx.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        proc = ctx.Process(
            target=_child_main,
            args=(child, self._build, self._args, level),
            name="streamllm-engine",
            daemon=True,
        )
        proc.start()
        child.close()
        try:
            if not parent.poll(self.start_timeout):
                raise EngineUnavailable(f"the engine process did not load within {self.start_timeout:.0f} s")
            msg = parent.recv()
        except (EOFError, OSError):
            msg = ("failed", f"the engine process exited while loading (exit code {proc.exitcode})")
        except BaseException:
            proc.kill()
            raise
        if msg[0] != "ready":
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            raise EngineUnavailable(msg[1])
        _, self.tokenizer, self.eos, self.config, self.vocab_size = msg
        with self._lock:
            self._conn, self._proc = parent, proc
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._loop.add_reader, parent.fileno(), self._readable, parent, proc
            )
        else:
            relay = threading.Thread(
                target=self._read, args=(parent, proc), name="streamllm-engine-relay", daemon=True
            )
            relay.start()
        log.info("engine process %d ready", proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._conn is not None else None

    @property
    def running(self) -> bool:
        return self._conn is not None and not self._stopping

    @property
    def available(self) -> bool:
        """False while a dead child is being replaced (and once stopped)."""
        return self.running

    def start(self) -> None:
        """The child steps from `launch` on; nothing more to start."""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step: in-flight requests end with 'abort', later submits are refused so."""
        with self._lock:
            self._stopping = True
            proc = self._proc
            self._send(("stop",))
        if proc is None:
            return
        proc.join(timeout)
        if proc.is_alive():
            log.error("the engine process did not stop within %.0f s: killed", timeout)
            proc.kill()
            proc.join(5)
        self._gone.wait(timeout)

    def close(self) -> None:
        """After `stop` (the child closes its KV tiers itself on the way out)."""

    # -- the calls -------------------------------------------------------------------------------
    def submit(
        self,
        session_id: str | None,
        tokens: list[int],
        params: SamplingParams | None,
        loop: asyncio.AbstractEventLoop | None = None,
        rebuild: Rebuild | None = None,
        sink_tokens: int | None = None,
    ) -> Handle:
        """As `Engine.submit`; refused at once with 'abort' once stopping, with 'engine_restarting' meanwhile."""
        check_turn(tokens, sink_tokens, rebuild, self.config.cache.capacity, self.vocab_size)
        request_id, stream = new_request_id(), RequestStream(loop)
        refusal = None
        with self._lock:
            if self._stopping:
                refusal = TokenEvent(None, "", finish_reason="abort")
            elif self._conn is None:
                refusal = TokenEvent(None, "", finish_reason="error", error=RESTARTING)
            else:
                self._streams[request_id] = stream
                self._send(("submit", request_id, session_id, list(tokens), params, rebuild, sink_tokens))
        if refusal is not None:
            stream.put(refusal)
        return Handle(request_id, stream)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._streams:
                self._send(("abort", request_id))

    def stats(self, session_id: str) -> SessionStats | None:
        result: SessionStats | None = self._call("stats", session_id).result()
        return result

    def session_state(self, session_id: str) -> Rebuild | None:
        result: Rebuild | None = self._call("session_state", session_id).result()
        return result

    def close_session(self, session_id: str) -> bool:
        return bool(self._call("close_session", session_id).result())

    def truncate(self, session_id: str, n: int) -> bool:
        return bool(self._call("truncate", session_id, n).result())

    def offload(self, session_id: str) -> None:
        self._call("offload", session_id).result()

    def read_tier_counts(self) -> Future[TierCounts]:
        return self._call("tier_counts")

    def holds(self, session_ids: list[str]) -> Future[dict[str, bool]]:
        return self._call("holds", list(session_ids))

    def _call(self, name: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._conn is None or self._stopping:
                future.set_exception(EngineUnavailable("the engine process is not running"))
                return future
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            self._send(("call", call_id, name, args))
        return future

    def _send(self, msg: tuple[Any, ...]) -> None:
        """Under the lock. A child that is gone is noticed by the relay thread, which ends what was sent."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(msg)

    # -- reading the child's messages -----------------------------------------------------------
    def _readable(self, conn: Connection, proc: multiprocessing.process.BaseProcess) -> None:
        """On the event loop: every message that has arrived; a child gone is handled off the loop."""
        assert self._loop is not None
        try:
            while conn.poll(0):
                self._dispatch(conn.recv(), on_loop=True)
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            threading.Thread(target=self._lost, args=(conn, proc), name="streamllm-engine-lost").start()

    def _read(self, conn: Connection, proc: multiprocessing.process.BaseProcess) -> None:
        """The relay thread (no event loop given): every message until the child is gone."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self._dispatch(msg, on_loop=False)
        self._lost(conn, proc)

    def _dispatch(self, msg: tuple[Any, ...], on_loop: bool) -> None:
        """Events to their streams (the last one of a request drops it), answers to their futures."""
        if msg[0] == "events":
            for request_id, event in msg[1]:
                if event.finish_reason is None:
                    stream = self._streams.get(request_id)
                else:
                    stream = self._streams.pop(request_id, None)
                if stream is None:
                    continue
                if on_loop:
                    stream.put_from_loop(event)
                else:
                    stream.put(event)
            hook = self.on_step
            if hook is not None:
                for step in msg[2]:
                    hook(step)
        elif msg[0] == "result":
            _, call_id, ok, value = msg
            future = self._calls.pop(call_id, None)
            if future is not None:
                future.set_result(value) if ok else future.set_exception(value)

    def _lost(self, conn: Connection, proc: multiprocessing.process.BaseProcess) -> None:
        proc.join(5)
        with self._lock:
            self._conn = None
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
            stopping = self._stopping
        conn.close()
        if stopping:
            end = TokenEvent(None, "", finish_reason="abort")
        else:
            log.error("the engine process exited (exit code %s): restarting it", proc.exitcode)
            end = TokenEvent(None, "", finish_reason="error", error=RESTARTING)
        for stream in streams.values():
            stream.put(end)
        for future in calls.values():
            future.set_exception(EngineUnavailable(f"the engine process exited (exit code {proc.exitcode})"))
        if stopping:
            self._gone.set()
            return
        pause = 1.0
        while not self._stopping:
            try:
                self._spawn()
                self.restarts += 1
                return
            except Exception as e:
                log.error("restarting the engine process failed (%s): again in %.0f s", e, pause)
                time.sleep(pause)
                pause = min(pause * 2, 60.0)
        self._gone.set()
