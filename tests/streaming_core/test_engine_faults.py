"""Engine faults and edge cases on a tiny random Llama: failed steps, rebuilds, foreign tokens, seeds,
penalties over the session, shutdown with queued work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from streaming_core.batch import BatchPlan
from streaming_core.engine import Engine, Rebuild
from streaming_core.sampler import SamplingParams
from streaming_core.session import TokenEvent

from .helpers import tiny_llama, wrap
from .test_engine import GREEDY, S, W, generate, make_engine, prompt

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_llama())


def turn(engine: Engine, sid: str | None, tokens: list[int], params=GREEDY, **kw: Any) -> list[TokenEvent]:
    """All events of one turn, read synchronously (works with or without the loop thread)."""
    h = engine.submit(sid, tokens, params, **kw)
    if not engine.running:
        engine.run_until_done(h)
    return list(h.stream)


def fail_next_step(engine: Engine, min_chunks: int = 1) -> Callable[[], int]:
    """Make the next step of at least `min_chunks` chunks fail after the runner wrote its KV (as a failed
    sampling or logits pass would); returns a counter of the failures injected."""
    run, armed, failures = engine.runner.run, [True], [0]

    def flaky(plan: BatchPlan):
        out = run(plan)
        if armed[0] and len(plan.chunks) >= min_chunks:
            armed[0] = False
            failures[0] += 1
            raise RuntimeError("injected step failure")
        return out

    engine.runner.run = flaky  # type: ignore[method-assign]
    return lambda: failures[0]


def test_failed_step_drops_its_sessions_and_the_engine_goes_on(model):
    """Requests in a failed step end with an error, their sessions are forgotten (their KV holds tokens of
    a turn that never completed), a rebuild then equals the committed stream, and other work goes on."""
    history, bystander = prompt(20, 41), prompt(9, 42)
    engine = make_engine(model)
    engine.start()
    try:
        one = SamplingParams(max_tokens=1, temperature=0)
        assert turn(engine, "s", history, one)[-1].finish_reason == "length"
        b = engine.submit("other", bystander, SamplingParams(max_tokens=10_000, temperature=0))
        failures = fail_next_step(engine, min_chunks=2)  # the step that holds both sessions
        a = engine.submit("s", prompt(12, 43), GREEDY)
        ends = [list(a.stream)[-1], list(b.stream)[-1]]
        assert failures() == 1
        assert all(e.finish_reason == "error" and "injected" in (e.error or "") for e in ends)
        assert engine.stats("s") is None and engine.stats("other") is None
        assert not engine.scheduler.running and sorted(engine.scheduler.free_slots) == [0, 1, 2, 3]
        # the engine goes on, and the failed session is rebuilt from what was committed
        follow = prompt(3, 44)
        events = turn(engine, "s", follow, rebuild=Rebuild(history[:S], history[S:], len(history)))
        got = [e.token for e in events if e.token is not None]
        assert events[-1].finish_reason == "length"
        assert got == generate(make_engine(model), None, history + follow)
        assert engine.stats("s").tokens_seen == len(history) + len(follow) + len(got) - 1
        assert turn(engine, "new", bystander)[-1].finish_reason == "length"
    finally:
        engine.stop()


def test_failed_inline_step_raises_and_drops_nothing_silently(model):
    """Without the loop thread a failing step propagates to the caller (tests, benchmarks) as before."""
    engine = make_engine(model)
    fail_next_step(engine)
    h = engine.submit("s", prompt(5, 45), GREEDY)
    with pytest.raises(RuntimeError, match="injected"):
        engine.run_until_done(h)


def test_rebuild_without_sinks_keeps_tokens_seen(model):
    """With sink_tokens 0 the rebuild's jump in stream index is due before the first chunk: the counter
    carries on from the record, and the rebuilt KV is the shifted stream of the tail."""
    long = prompt(3 * (S + W), 46)
    original = make_engine(model)
    generate_0 = SamplingParams(max_tokens=1, temperature=0)
    turn(original, "s", long, generate_0, sink_tokens=0)
    s = original.scheduler.sessions["s"]
    assert s.sinks == [] and len(s.tail) == S + W and s.tokens_seen == len(long)
    tail = list(s.tail)
    follow = prompt(4, 47)
    rebuilt = make_engine(model)
    events = turn(rebuilt, "s", follow, rebuild=Rebuild([], tail, len(long)), sink_tokens=0)
    got = [e.token for e in events if e.token is not None]
    assert rebuilt.stats("s").tokens_seen == len(long) + len(follow) + len(got) - 1
    fresh = make_engine(model)
    assert got == [e.token for e in turn(fresh, None, tail + follow, sink_tokens=0) if e.token is not None]


@pytest.mark.parametrize(
    ("tokens", "rebuild"),
    [
        ([VOCAB], None),
        ([-1], None),
        ([5], Rebuild([VOCAB + 70], [], 1)),
        ([5], Rebuild([1, 2, 3, 4], [9, -3], 6)),
    ],
)
@pytest.mark.parametrize("params", [GREEDY, None])
def test_out_of_range_tokens_are_refused(model, tokens, rebuild, params):
    """Token ids outside the model's vocabulary (e.g. a session record written under another model) are
    refused before anything is queued."""
    engine = make_engine(model)
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {VOCAB}\)"):
        engine.submit("s", tokens, params, rebuild=rebuild)
    assert engine.scheduler.sessions == {} and not engine.scheduler.has_work


def test_unseeded_requests_are_not_replayed_across_engines(model):
    """Unseeded sampling draws from OS entropy: two fresh engines (restarts, replicas) do not replay one
    stream; a seeded request stays reproducible."""
    free = SamplingParams(max_tokens=48, temperature=1.0)
    seeded = SamplingParams(max_tokens=48, temperature=1.0, seed=1234)
    tokens = prompt(8, 48)

    def sample(params: SamplingParams) -> list[int]:
        return generate(make_engine(model), None, tokens, params)

    assert sample(free) != sample(free)
    assert sample(seeded) == sample(seeded)


def test_repetition_penalty_sees_the_whole_session(model):
    """The penalty covers every token the cache holds: a session's second turn equals the stateless
    request carrying the whole conversation."""
    p = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3)
    first, second = prompt(10, 49), prompt(6, 50)
    engine = make_engine(model)
    r1 = generate(engine, "s", first, p)
    r2 = generate(engine, "s", [r1[-1], *second], p)
    assert engine.stats("s").evicted == 0
    assert r2 == generate(make_engine(model), None, first + r1 + second, p)
    # the same after a rebuild: the penalty covers the rebuilt sinks and tail
    rebuilt = make_engine(model)
    record = Rebuild(first[:S], [*first[S:], *r1[:-1]], len(first) + len(r1) - 1)
    assert generate_with(rebuilt, "s", [r1[-1], *second], p, rebuild=record) == r2


def generate_with(
    engine: Engine, sid: str, tokens: list[int], params: SamplingParams, **kw: Any
) -> list[int]:
    return [e.token for e in turn(engine, sid, tokens, params, **kw) if e.token is not None]


def test_stop_resolves_queued_calls_and_racing_submits(model):
    """Jobs still queued when the loop stops are run (or refused) rather than left pending: a caller blocked
    on stats() returns, a submit racing stop ends with an event, the running request ends with 'abort'."""
    engine = make_engine(model)
    run, gate, inside = engine.runner.run, threading.Event(), threading.Event()

    def held(plan: BatchPlan):
        inside.set()
        gate.wait(10)
        return run(plan)

    engine.runner.run = held  # type: ignore[method-assign]
    engine.start()
    running = engine.submit("a", prompt(6, 51), SamplingParams(max_tokens=10_000, temperature=0))
    assert inside.wait(10)  # the loop thread is inside a step: what follows is queued
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.append(engine.stats("a")), daemon=True)
    caller.start()
    racing = engine.submit("b", prompt(6, 52), GREEDY)
    stopper = threading.Thread(target=engine.stop, daemon=True)
    stopper.start()
    while not engine.loop.stopping:
        time.sleep(0.001)
    gate.set()
    stopper.join(10)
    caller.join(10)
    assert not stopper.is_alive() and not caller.is_alive(), "a caller was left waiting on the engine"
    assert results and results[0] is not None
    assert running.stream.done.wait(5) and racing.stream.done.wait(5)
    assert list(running.stream)[-1].finish_reason == "abort"
    assert list(racing.stream)[-1].finish_reason == "abort"
    assert engine.requests == {} and not engine.running
    # after stop, calls run inline and a new submit is refused at once rather than never served
    assert engine.stats("a") is not None
    late = engine.submit("c", prompt(3, 53), GREEDY)
    assert late.stream.done.wait(5) and list(late.stream)[-1].finish_reason == "abort"


def test_refused_rebuild_leaves_no_session(model):
    """A rebuild refused at once (full queue) leaves nothing behind: the next try rebuilds from scratch."""
    engine = make_engine(model)
    engine.scheduler.max_waiting = 0
    record = Rebuild([], prompt(40, 54), 100)
    events = turn(engine, "s", [3], GREEDY, rebuild=record, sink_tokens=0)
    assert [e.error for e in events] == ["queue_full"]
    assert engine.stats("s") is None
    engine.scheduler.max_waiting = 8
    turn(engine, "s", [3], SamplingParams(max_tokens=1, temperature=0), rebuild=record, sink_tokens=0)
    assert engine.stats("s").tokens_seen == 101
