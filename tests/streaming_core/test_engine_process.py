"""The engine in a process of its own (`engine_process.EngineProcess`) answers as the engine does in this
process: the same tokens, texts and finish reasons for the same turns, the same session calls, step stats
for the metrics; a child that is killed ends its requests with 'engine_restarting' and is replaced; stop
ends what is in flight with 'abort'."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from streaming_core.engine import Engine, StepStats
from streaming_core.engine_process import RESTARTING, EngineProcess, EngineUnavailable
from streaming_core.sampler import SamplingParams

from ..server.tiny import tiny_engine


def build_tiny(num_slots: int) -> Engine:
    """Runs in the child: the 2-layer random Llama with the default model's tokenizer."""
    from transformers import AutoTokenizer

    from streaming_core.loader import cached_gguf_dir, default_gguf_path

    return tiny_engine(AutoTokenizer.from_pretrained(cached_gguf_dir(default_gguf_path())), num_slots)


@pytest.fixture(scope="module")
def child() -> Any:
    engine = EngineProcess(build_tiny, 4, start_timeout=300).launch()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def local() -> Engine:
    return build_tiny(4)


def events(handle: Any) -> list[tuple[int | None, str, str | None, str | None]]:
    return [(e.token, e.text, e.finish_reason, e.error) for e in handle.stream]


def test_turns_stream_what_the_engine_in_this_process_streams(child, local):
    params = SamplingParams(max_tokens=20, temperature=0)
    prompts = {f"s{i}": local.tokenizer.encode(f"Tell me about planet number {i}.") for i in range(3)}
    for engine in (child, local):
        assert engine.eos == local.eos and engine.config == local.config
    for _ in range(2):  # the second turn continues each session's KV
        got = [child.submit(sid, toks, params) for sid, toks in prompts.items()]  # three at once
        want = [local.submit(sid, toks, params) for sid, toks in prompts.items()]
        local.run_until_done(*want)
        assert [events(h) for h in got] == [events(h) for h in want]
        for sid in prompts:
            assert child.stats(sid) == local.stats(sid)
            assert child.session_state(sid) == local.session_state(sid)
        prompts = {sid: local.tokenizer.encode(" And then?") for sid in prompts}
    assert child.holds(["s0", "nobody"]).result() == {"s0": True, "nobody": False}
    assert child.read_tier_counts().result().slot_sessions == 3
    assert child.truncate("s1", 2) and local.truncate("s1", 2)
    assert child.stats("s1") == local.stats("s1")
    assert child.close_session("s2") and child.stats("s2") is None
    assert not child.close_session("s2")


def test_refusals_and_aborts(child, local):
    with pytest.raises(ValueError, match="at least one new token"):
        child.submit("x", [], None)
    with pytest.raises(ValueError, match="token ids must be in"):
        child.submit("x", [local.model.vocab_size], None)
    long = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
    handle = child.submit("busy", [1, 2, 3], long)
    stream = iter(handle.stream)
    next(stream)
    second = child.submit("busy", [4], long)  # the session already has a request running
    assert events(second) == [(None, "", "error", "session_busy")]
    child.abort(handle.request_id)
    rest = list(stream)
    assert rest[-1].finish_reason == "abort" and rest[-1].completion_tokens >= 1
    assert child.stats("busy").busy is False


def test_step_stats_reach_the_hook(child):
    seen: list[StepStats] = []
    child.on_step = seen.append
    try:
        handle = child.submit(None, [5, 6, 7], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
        assert events(handle)[-1][2] == "length"
        deadline = time.monotonic() + 10
        while sum(s.generated for s in seen) < 9 and time.monotonic() < deadline:
            time.sleep(
                0.01
            )  # the hook runs on the relay thread, which may still be handing the last step over
    finally:
        child.on_step = None
    assert sum(s.generated for s in seen) == 9 and sum(s.prefilled for s in seen) == 3
    assert all(s.num_slots == 4 for s in seen)


def test_a_killed_engine_process_ends_its_requests_and_is_replaced():
    engine = EngineProcess(build_tiny, 2, start_timeout=300).launch()
    try:
        handle = engine.submit("doomed", [1, 2, 3], SamplingParams(max_tokens=100_000, ignore_eos=True))
        stream = iter(handle.stream)
        next(stream)
        pid = engine.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        last = list(stream)[-1]
        assert (last.finish_reason, last.error) == ("error", RESTARTING)
        deadline = time.monotonic() + 120
        while not engine.available and time.monotonic() < deadline:
            refused = engine.submit("meanwhile", [1], None)  # refused at once while the child is replaced
            assert events(refused) in ([(None, "", "error", RESTARTING)], [(None, "", "stop", None)])
            time.sleep(0.05)
        assert engine.available and engine.restarts == 1 and engine.pid != pid
        assert engine.stats("doomed") is None  # its KV died with the child: the next turn rebuilds it
        again = engine.submit("doomed", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        assert events(again)[-1][2] in ("length", "stop")
    finally:
        engine.stop()


def test_stop_ends_what_is_in_flight_with_abort():
    engine = EngineProcess(build_tiny, 2, start_timeout=300).launch()
    handle = engine.submit("s", [1, 2, 3], SamplingParams(max_tokens=100_000, ignore_eos=True))
    stream = iter(handle.stream)
    next(stream)
    engine.stop()
    assert list(stream)[-1].finish_reason == "abort"
    assert events(engine.submit("s", [4], None)) == [(None, "", "abort", None)]
    with pytest.raises(EngineUnavailable):
        engine.stats("s")
    assert not engine.running and not engine.available
