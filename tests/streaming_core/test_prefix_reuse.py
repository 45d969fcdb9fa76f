"""Prefix reuse on a tiny random Llama: a new session whose prompt starts with tokens another slot holds from
its stream's start copies their KV, and every token and logprob equals an engine that prefills everything."""

from __future__ import annotations

import pytest
import torch

from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine, Rebuild
from streaming_core.sampler import SamplingParams
from streaming_core.session import TokenEvent

from .helpers import tiny_llama, wrap
from .test_engine import S, W, WordTokenizer, prompt
from .test_engine_faults import fail_next_step, turn

SCORED = SamplingParams(max_tokens=8, temperature=0, logprobs=True)
ONE = SamplingParams(max_tokens=1, temperature=0, logprobs=True)


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_llama())


def engine_for(model, reuse: bool, num_slots: int = 4) -> Engine:
    cache = CacheConfig(sink_tokens=S, window=W, num_slots=num_slots, prefill_chunk=16, prefix_reuse=reuse)
    return Engine(model, WordTokenizer(), EngineConfig(cache=cache))


def same(got: list[TokenEvent], want: list[TokenEvent]) -> None:
    """The same tokens with the same logprobs (fp32; only the prefill's chunk boundaries differ)."""
    assert [e.token for e in got] == [e.token for e in want]
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in got if e.token is not None]),
        torch.tensor([e.logprob for e in want if e.token is not None]),
        atol=1e-5,
        rtol=1e-5,
    )


class Pair:
    """The same calls on an engine with prefix reuse and on one without; results compared as they come."""

    def __init__(self, model, num_slots: int = 4) -> None:
        self.reuse, self.plain = engine_for(model, True, num_slots), engine_for(model, False, num_slots)

    def turn(self, sid: str | None, tokens: list[int], params=SCORED, **kw) -> int:
        """Run the turn on both, check they agree, and return the tokens the reusing engine copied."""
        got, want = turn(self.reuse, sid, tokens, params, **kw), turn(self.plain, sid, tokens, params, **kw)
        same(got, want)
        assert want[-1].reused_tokens == 0
        return got[-1].reused_tokens


def test_a_stateless_prompt_reuses_the_previous_ones_head_in_place(model):
    """The previous stateless request's slot is free and still holds its prompt: the next request sharing
    its head takes that slot and computes only the rest."""
    head = prompt(20, 1)
    pair = Pair(model)
    assert pair.turn(None, head + prompt(5, 2)) == 0
    free_before = sorted(pair.reuse.scheduler.free_slots)
    reused = pair.turn(None, [*head, 7, 8, 9])
    assert reused == 20
    assert pair.reuse.scheduler.reused_tokens == 20
    assert sorted(pair.reuse.scheduler.free_slots) == free_before  # the donor slot came back, no other used


def test_the_head_is_copied_from_a_live_session_which_goes_on_unchanged(model):
    head = prompt(18, 3)
    pair = Pair(model)
    pair.turn("a", head + prompt(4, 4))
    assert pair.turn(None, head + prompt(6, 5)) == 18  # copied out of a's slot (a is resident, idle)
    assert pair.turn("b", head + prompt(3, 6)) == 18  # a persistent session too
    assert pair.turn("a", prompt(5, 7)) == 0  # the donor's own next turn, unaffected by the copies
    assert pair.turn("b", prompt(5, 8)) == 0


def test_a_prompt_equal_to_a_held_run_still_computes_its_last_token(model):
    p = prompt(15, 9)
    pair = Pair(model)
    pair.turn("a", p, ONE)
    assert pair.turn(None, p) == len(p) - 1


def test_requests_admitted_in_one_step_share_and_the_batch_agrees(model):
    """Several new sessions admitted together, one adopting the donor slot and the others copying from
    slots that others in the same step write to; then all decode in one batch."""
    head = prompt(17, 10)
    pair = Pair(model)
    pair.turn(None, head + prompt(4, 11), ONE)
    results = []
    for engine in (pair.reuse, pair.plain):
        handles = [engine.submit(f"s{i}", head + prompt(3 + i, 12 + i), SCORED) for i in range(3)]
        engine.run_until_done(*handles)
        results.append([list(h.stream) for h in handles])
    for got, want in zip(*results, strict=True):
        same(got, want)
    assert [r[-1].reused_tokens for r in results[0]] == [17, 17, 17]


def test_once_the_ring_wraps_only_the_sinks_are_shared(model):
    long = prompt(S + W + 9, 13)
    pair = Pair(model)
    pair.turn("a", long, ONE)
    assert pair.reuse.scheduler.prefixes[pair.reuse.scheduler.sessions["a"].slot] == long[:S]
    assert pair.turn(None, [*long[:25], 1, 2]) == S


def test_a_truncated_session_shares_only_what_it_still_holds(model):
    head, extra = prompt(14, 14), prompt(5, 15)
    pair = Pair(model)
    pair.turn("a", head + extra, ONE)
    for engine in (pair.reuse, pair.plain):
        assert engine.truncate("a", len(extra))
    assert pair.turn(None, head + extra + [3]) == len(head)
    assert pair.turn("a", [*extra, 4]) == 0  # a refills from where the cut left it


def test_a_rebuild_shares_at_most_its_sinks(model):
    """Past capacity a rebuild's stream jumps after its sinks: only those can come from another slot."""
    long = prompt(3 * (S + W), 16)
    pair = Pair(model)
    pair.turn("donor", long[: S + 6], ONE)
    rebuild = Rebuild(long[:S], long[-W:], len(long))
    assert pair.turn("r", prompt(4, 17), rebuild=rebuild) == S
    exact = Rebuild(long[:S], long[S:20], 20)  # nothing evicted: no jump, the whole head may be shared
    assert pair.turn("e", [5, 6], rebuild=exact) == S + 6


def test_a_restored_slot_forgets_the_run_it_held_before(model):
    """A slot restored from the host tier holds another session's KV: the run recorded for its previous
    holder must not be offered (the prompt below would reuse b's tokens out of a's KV)."""
    head = prompt(12, 18)
    a_tokens, b_tokens = head + prompt(6, 19), head + prompt(6, 20)
    pair = Pair(model, num_slots=2)
    pair.turn("a", a_tokens, ONE)
    pair.turn("b", b_tokens, ONE)
    pair.turn("c", prompt(10, 21), ONE)  # offloads a
    pair.turn("a", [1], ONE)  # offloads b, a restored into b's slot
    restored = pair.reuse.scheduler.sessions["a"].slot
    assert restored not in pair.reuse.scheduler.prefixes
    assert pair.turn(None, [*b_tokens, 2]) == 0


def test_a_failed_step_forgets_every_run(model):
    engine = engine_for(model, True)
    head = prompt(16, 22)
    turn(engine, "a", head, ONE)
    assert engine.scheduler.prefixes
    engine.start()  # the loop thread turns a failed step into error events
    try:
        fail_next_step(engine)
        assert turn(engine, "b", [*head, 1], SCORED)[-1].finish_reason == "error"
        assert not engine.call(lambda: dict(engine.scheduler.prefixes)).result()
        assert turn(engine, None, [*head, 2], SCORED)[-1].reused_tokens == 0
    finally:
        engine.stop()


def test_disabled_reuse_copies_nothing(model):
    engine = engine_for(model, False)
    head = prompt(16, 23)
    turn(engine, None, [*head, 1], SCORED)
    assert turn(engine, None, [*head, 2], SCORED)[-1].reused_tokens == 0
    assert engine.scheduler.reused_tokens == 0
