"""Engine mechanics on a tiny random Llama: batching, offload, bounded memory, sessions, abort, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

from streaming_core.batch import BatchPlan, SeqChunk
from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine, Rebuild
from streaming_core.sampler import SamplingParams

from .helpers import make_runner, tiny_llama, wrap

S, W = 4, 28
GREEDY = SamplingParams(max_tokens=12, temperature=0)


class WordTokenizer:
    """Decodes ids as words; enough for the engine's detokenizer in mechanics tests."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_llama())


def make_engine(model, num_slots: int = 4, chunk: int = 16, budget: int = 512, eos=()) -> Engine:
    cache = CacheConfig(sink_tokens=S, window=W, num_slots=num_slots, prefill_chunk=chunk)
    return Engine(
        model, WordTokenizer(), EngineConfig(cache=cache, max_batch_tokens=budget), eos_token_ids=eos
    )


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(engine: Engine, session: str | None, tokens: list[int], params=GREEDY) -> list[int]:
    h = engine.submit(session, tokens, params)
    engine.run_until_done(h)
    return [e.token for e in h.stream if e.token is not None]


def test_batched_decode_logits_equal_unbatched(model):
    """Sessions at different positions (one far past capacity) in one forward equal each run alone."""
    lengths = [3, 17, 5 * (S + W) + 3]
    batched, alone = make_runner(model, S, W), make_runner(model, S, W)
    for slot, n in enumerate(lengths):
        toks = prompt(n, slot)
        for r in (batched, alone):
            for a in range(0, n, 16):
                r.run(BatchPlan((SeqChunk(slot, a, tuple(toks[a : a + 16]), "none"),)))
    nxt = [(slot, n, (slot + 7) * 3) for slot, n in enumerate(lengths)]
    out = batched.run(BatchPlan(tuple(SeqChunk(s, n, (t,), "last") for s, n, t in nxt)))
    for i, (s, n, t) in enumerate(nxt):
        single = alone.run(BatchPlan((SeqChunk(s, n, (t,), "last"),))).logits[0]
        torch.testing.assert_close(out.logits[i], single, atol=1e-5, rtol=1e-5)


def test_mixed_prefill_and_decode_step_equals_separate(model):
    """A step mixing decode rows and prefill chunks of other sessions gives each the same logits."""
    mixed, alone = make_runner(model, S, W), make_runner(model, S, W)
    a, b = prompt(40, 1), prompt(50, 2)
    for r in (mixed, alone):
        r.run(BatchPlan((SeqChunk(0, 0, tuple(a), "none"),)))
    step = mixed.run(BatchPlan((SeqChunk(1, 0, tuple(b), "last"), SeqChunk(0, 40, (9,), "last"))))
    torch.testing.assert_close(
        step.logits[1], alone.run(BatchPlan((SeqChunk(0, 40, (9,), "last"),))).logits[0]
    )
    torch.testing.assert_close(
        step.logits[0], alone.run(BatchPlan((SeqChunk(1, 0, tuple(b), "last"),))).logits[0]
    )


def test_engine_batch_equals_each_alone(model):
    prompts = [prompt(5, 1), prompt(30, 2), prompt(90, 3), prompt(12, 4)]
    together = make_engine(model)
    handles = [together.submit(f"s{i}", p, GREEDY) for i, p in enumerate(prompts)]
    together.run_until_done(*handles)
    got = [[e.token for e in h.stream if e.token is not None] for h in handles]
    want = [generate(make_engine(model), "x", p) for p in prompts]
    assert got == want
    assert all(len(g) == GREEDY.max_tokens for g in got)


def test_offload_restore_changes_nothing(model):
    first, second = prompt(20, 5), prompt(9, 6)
    plain = make_engine(model)
    t1 = generate(plain, "a", first)
    t2 = generate(plain, "a", [t1[-1], *second])

    moved = make_engine(model)
    assert generate(moved, "a", first) == t1
    moved.offload("a")
    assert moved.stats("a").location == "host"
    assert generate(moved, "a", [t1[-1], *second]) == t2
    assert moved.stats("a").location == "slot"


def test_sessions_beyond_the_pool_are_offloaded_lru_and_restored(model):
    engine = make_engine(model, num_slots=2)
    ref = make_engine(model, num_slots=8)
    for sid in "abc":
        assert generate(engine, sid, prompt(10, ord(sid))) == generate(ref, sid, prompt(10, ord(sid)))
    assert engine.stats("a").location == "host"  # least recently used when c needed a slot
    assert engine.scheduler.offloads == 1
    follow = prompt(6, 99)
    assert generate(engine, "a", follow) == generate(ref, "a", follow)
    assert engine.stats("a").location == "slot"
    assert engine.stats("b").location == "host"


def test_two_turns_equal_one_stateless_stream(model):
    """The session after turn 1 holds exactly prompt + reply[:-1]; turn 2 continues it."""
    p1, p2 = prompt(15, 7), prompt(8, 8)
    engine = make_engine(model)
    r1 = generate(engine, "chat", p1)
    r2 = generate(engine, "chat", [r1[-1], *p2])
    assert engine.stats("chat").tokens_seen == len(p1) + len(r1) + len(p2) + len(r2) - 1
    stateless = generate(make_engine(model), None, p1 + r1 + p2)
    assert r2 == stateless


def test_long_prompt_is_chunked_with_bounded_memory(model):
    """A prompt 10x the capacity goes through forwards of at most prefill_chunk tokens; the pool never grows."""
    engine = make_engine(model, chunk=16)
    sizes: list[int] = []
    run = engine.runner.run
    engine.runner.run = lambda plan: (sizes.append(plan.num_tokens), run(plan))[1]  # type: ignore[method-assign]
    storage = (engine.pool.k.data_ptr(), engine.pool.k.shape, engine.pool.v.data_ptr(), engine.pool.v.shape)
    long = prompt(10 * (S + W), 11)
    out = generate(engine, "long", long, SamplingParams(max_tokens=3, temperature=0))
    assert max(sizes) <= 16 and len(sizes) >= len(long) // 16
    assert (
        engine.pool.k.data_ptr(),
        engine.pool.k.shape,
        engine.pool.v.data_ptr(),
        engine.pool.v.shape,
    ) == storage
    stats = engine.stats("long")
    assert stats.cache_tokens == S + W and stats.tokens_seen == len(long) + 2
    # chunking changes nothing: the same prompt fed token by token predicts the same continuation
    assert (
        generate(make_engine(model, chunk=1), "x", long, SamplingParams(max_tokens=3, temperature=0)) == out
    )


def test_stateless_requests_leave_no_session(model):
    engine = make_engine(model)
    generate(engine, None, prompt(10, 1))
    assert engine.scheduler.sessions == {}
    assert sorted(engine.scheduler.free_slots) == list(range(4))


def test_busy_session_and_full_queue_are_refused(model):
    engine = make_engine(model)
    h1 = engine.submit("s", prompt(5, 1), GREEDY)
    h2 = engine.submit("s", prompt(5, 2), GREEDY)
    assert [e.error for e in h2.stream] == ["session_busy"]
    engine.run_until_done(h1)
    small = Engine(model, WordTokenizer(), EngineConfig(cache=CacheConfig(S, W, 1, 16), max_waiting=1))
    ok = small.submit("a", prompt(5, 1), GREEDY)
    full = small.submit("b", prompt(5, 2), GREEDY)
    assert [e.error for e in full.stream] == ["queue_full"]
    small.run_until_done(ok)


def test_stop_token_and_max_tokens(model):
    engine = make_engine(model)
    free = generate(engine, None, prompt(10, 3))
    stop_at = free[4]
    h = engine.submit(
        None, prompt(10, 3), SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,))
    )
    engine.run_until_done(h)
    events = list(h.stream)
    assert events[-1].finish_reason == "stop"
    assert [e.token for e in events] == free[: free.index(stop_at) + 1]
    h = engine.submit(None, prompt(10, 3), SamplingParams(max_tokens=3, temperature=0))
    engine.run_until_done(h)
    assert [e.finish_reason for e in h.stream] == [None, None, "length"]


def test_stop_string_truncates_text(model):
    engine = make_engine(model)
    free = generate(engine, None, prompt(10, 3))
    stop = f" w{free[3]}"
    h = engine.submit(None, prompt(10, 3), SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    engine.run_until_done(h)
    events = list(h.stream)
    assert events[-1].finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert stop not in text and text == "".join(f" w{t}" for t in free[: free.index(free[3])])


async def test_async_stream_and_abort_within_a_step(model):
    engine = make_engine(model)
    engine.start()
    try:
        loop = asyncio.get_running_loop()
        h = engine.submit("s", prompt(10, 1), SamplingParams(max_tokens=10_000, temperature=0), loop=loop)
        seen = 0
        async for event in h.stream:
            seen += 1
            if seen == 3:
                steps = engine.steps
                engine.abort(h.request_id)
            if event.finish_reason:
                break
        assert event.finish_reason == "abort"
        assert engine.steps - steps <= 2
        stats = engine.stats("s")
        assert stats is not None and not stats.busy
        # the session goes on after an abort
        h2 = engine.submit("s", [5], SamplingParams(max_tokens=2, temperature=0), loop=loop)
        events = [e async for e in h2.stream]
        assert events[-1].finish_reason == "length"
    finally:
        engine.stop()


def test_rebuild_is_exact_while_nothing_was_evicted(model):
    history = prompt(20, 21)
    original = make_engine(model)
    generate(original, "s", history, SamplingParams(max_tokens=1, temperature=0))
    follow = prompt(5, 22)
    want = generate(original, "s", follow)
    other = make_engine(model)
    h = other.submit("s", follow, GREEDY, rebuild=Rebuild(history[:S], history[S:], len(history)))
    other.run_until_done(h)
    assert [e.token for e in h.stream if e.token is not None] == want
    assert other.stats("s").tokens_seen == original.stats("s").tokens_seen


def test_rebuild_after_eviction_keeps_counts_and_is_the_shifted_stream(model):
    """Past capacity a rebuild re-prefills sinks + tail at their stream indices: it equals a fresh stream
    of sinks + tail (attention only sees distances), and the counters carry on."""
    long = prompt(5 * (S + W), 23)
    original = make_engine(model)
    generate(original, "s", long, SamplingParams(max_tokens=1, temperature=0))
    s = original.scheduler.sessions["s"]
    sinks, tail, seen = list(s.sinks), list(s.tail), s.tokens_seen
    assert len(sinks) == S and len(tail) == W and seen == len(long)
    follow = prompt(6, 24)
    rebuilt = make_engine(model)
    h = rebuilt.submit("s", follow, GREEDY, rebuild=Rebuild(sinks, tail, seen))
    rebuilt.run_until_done(h)
    got = [e.token for e in h.stream if e.token is not None]
    assert rebuilt.stats("s").tokens_seen == seen + len(follow) + len(got) - 1
    assert got == generate(make_engine(model), None, sinks + tail + follow)


def test_truncate_equals_never_having_fed_the_tokens(model):
    """While nothing was evicted, dropping the last n tokens leaves exactly the shorter stream."""
    head, extra, follow = prompt(12, 31), prompt(5, 32), prompt(4, 33)
    engine = make_engine(model)
    generate(engine, "s", head + extra, SamplingParams(max_tokens=1, temperature=0))
    assert engine.truncate("s", len(extra))
    assert engine.stats("s").tokens_seen == len(head)
    assert generate(engine, "s", follow) == generate(make_engine(model), None, head + follow)
    assert not engine.truncate("s", 10_000)
    assert not engine.truncate("missing", 1)


def test_stop_token_flushes_held_back_text(model):
    """Text held back as a possible stop-string prefix is released when generation ends on a stop id."""
    engine = make_engine(model)
    free = generate(engine, None, prompt(10, 3))
    held = f" w{free[2]}"
    params = SamplingParams(max_tokens=12, temperature=0, stop=(held + " never",), stop_token_ids=(free[3],))
    h = engine.submit(None, prompt(10, 3), params)
    engine.run_until_done(h)
    events = list(h.stream)
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == "".join(f" w{t}" for t in free[:3])  # the stop id adds no text


@pytest.mark.parametrize(
    ("weights", "kv_dtype", "want"),
    [
        ("int4", "auto", torch.bfloat16),  # quantized weights on the CPU: bf16 KV by default
        ("int8", "auto", torch.bfloat16),
        ("dense", "auto", torch.float32),  # dense fp32 stays exact
        ("int4", "float32", torch.float32),  # an explicit choice wins
        (None, "auto", torch.float32),  # raw checkpoint weights
    ],
)
def test_kv_pool_dtype_follows_the_weights(weights, kv_dtype, want):
    model = wrap(tiny_llama())
    if weights is not None:
        model.prepare(weights)
    config = EngineConfig(cache=CacheConfig(S, W, 2, 16), kv_dtype=kv_dtype)
    engine = Engine(model, WordTokenizer(), config)
    assert engine.pool.k.dtype == engine.pool.v.dtype == want
    assert generate(engine, "s", prompt(40, 1))  # it decodes past a full window with that pool
