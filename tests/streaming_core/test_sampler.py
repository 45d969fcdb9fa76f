"""Sampler: parameter validation, greedy, seeds, top-k/top-p distributions, penalties, logprobs, batching."""

from __future__ import annotations

import math

import pytest
import torch

from streaming_core.sampler import RequestSampler, SamplingParams, apply_penalties, sample

V = 32


def make(prompt: tuple[int, ...] = (), fallback: torch.Generator | None = None, **kw) -> RequestSampler:
    return RequestSampler(SamplingParams(**kw), prompt, V, fallback)


def run(steps: torch.Tensor, requests: list[RequestSampler]) -> list[list[int]]:
    """steps [S, B, V] -> tokens chosen per row over the S steps."""
    tokens = [[s.token for s in sample(logits, requests)] for logits in steps]
    return [list(col) for col in zip(*tokens, strict=True)]


def draw_many(row: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """Tokens of n unseeded requests sampled in one batch from the same logits row [V] -> [n]."""
    fallback = torch.Generator().manual_seed(1234)
    requests = [RequestSampler(SamplingParams(**kw), (), row.numel(), fallback) for _ in range(n)]
    return torch.tensor([s.token for s in sample(row.expand(n, -1), requests)])


def frequencies(tokens: torch.Tensor, v: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=v).float() / tokens.numel()  # [V]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("seed", 2**64),
        ("stop", ("a", "b", "c", "d", "e")),
        ("stop", ("ok", "")),
        ("stop_token_ids", (3, -1)),
        ("presence_penalty", 2.1),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_invalid_field_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(logprobs=True, **{field: value})  # type: ignore[arg-type]


def test_top_logprobs_needs_logprobs() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=2)


def test_range_edges_are_accepted() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, seed=-1, presence_penalty=-2.0)
    SamplingParams(temperature=2.0, top_p=1e-6, frequency_penalty=2.0, logprobs=True, top_logprobs=20)
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]


def test_greedy_and_top_k_1_take_argmax() -> None:
    torch.manual_seed(0)
    steps = torch.randn(5, 4, V)  # [S, B, V]
    argmax = steps.argmax(-1).T.tolist()  # [B, S]
    assert run(steps, [make(temperature=0.0) for _ in range(4)]) == argmax
    assert run(steps, [make(temperature=1.5, top_k=1) for _ in range(4)]) == argmax


def test_seed_reproduces_tokens() -> None:
    steps = 0.3 * torch.randn(8, 1, V, generator=torch.Generator().manual_seed(1))  # [S, 1, V]
    first = run(steps, [make(seed=42)])
    assert run(steps, [make(seed=42)]) == first
    assert run(steps, [make(seed=43)]) != first


def test_seeded_row_ignores_its_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    steps = 0.3 * torch.randn(8, 5, V, generator=gen)  # [S, B, V]
    [alone] = run(steps[:, 2:3], [make(seed=7, top_p=0.9)])
    fallback = torch.Generator().manual_seed(0)
    others = [
        make(fallback=fallback),
        make(seed=7, top_k=3),
        make(seed=7, top_p=0.9),
        make(temperature=0.0, frequency_penalty=1.0),
        make(fallback=fallback, temperature=0.5, repetition_penalty=1.5, prompt=(1, 2, 3)),
    ]
    assert run(steps, others)[2] == alone


def test_unseeded_rows_draw_from_the_fallback() -> None:
    steps = 0.3 * torch.randn(8, 2, V, generator=torch.Generator().manual_seed(3))  # [S, B, V]
    runs = []
    for _ in range(2):
        fallback = torch.Generator().manual_seed(5)
        runs.append(run(steps, [make(fallback=fallback), make(fallback=fallback)]))
    assert runs[0] == runs[1]


def test_plain_sampling_follows_softmax_over_temperature() -> None:
    logits = torch.randn(8, generator=torch.Generator().manual_seed(4))  # [V]
    freq = frequencies(draw_many(logits, 20000, temperature=0.7), 8)
    assert (freq - torch.softmax(logits / 0.7, -1)).abs().max() < 0.015


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0, 1.8, -0.5, 0.2])  # [V]
    freq = frequencies(draw_many(logits, 20000, temperature=1.3, top_k=3), 8)
    expected = torch.zeros(8)
    expected[[1, 3, 5]] = torch.softmax(logits[[1, 3, 5]] / 1.3, -1)
    assert set(freq.nonzero().flatten().tolist()) == {1, 3, 5}
    assert (freq - expected).abs().max() < 0.015


@pytest.mark.parametrize(("top_p", "kept"), [(0.7, [2, 0]), (0.9, [2, 0, 3]), (1.0, [2, 0, 3, 1])])
def test_top_p_keeps_the_smallest_nucleus(top_p: float, kept: list[int]) -> None:
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])  # [V], sorted order 2, 0, 3, 1
    freq = frequencies(draw_many(probs.log(), 20000, top_p=top_p), 4)
    expected = torch.zeros(4)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert set(freq.nonzero().flatten().tolist()) == set(kept)
    assert (freq - expected).abs().max() < 0.015


def test_apply_penalties_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])  # [B, V]
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 1.0, 0.0]])  # [B, V]
    seen = torch.tensor([[True, True, False, False], [False, True, True, False]])  # [B, V]
    presence = torch.tensor([[0.5], [-0.25]])  # [B, 1]
    frequency = torch.tensor([[0.1], [0.2]])  # [B, 1]
    repetition = torch.tensor([[2.0], [1.5]])  # [B, 1]
    expected = torch.tensor(
        [
            [2.0 / 2 - 2 * 0.1 - 0.5, -1.0 * 2, 0.5 - 0.1 - 0.5, 3.0],
            [1.0, 1.0 / 1.5 - 3 * 0.2 + 0.25, -2.0 * 1.5 - 0.2 + 0.25, 0.0],
        ]
    )
    out = apply_penalties(logits, counts, seen, presence, frequency, repetition)
    torch.testing.assert_close(out, expected)


def greedy_after(logits: list[float], history: list[int], **kw) -> int:
    """Greedy token from logits once the request has generated history."""
    request = RequestSampler(SamplingParams(temperature=0.0, **kw), (), len(logits))
    for token in history:
        request.record(token)
    return sample(torch.tensor([logits]), [request])[0].token


def test_frequency_and_presence_penalties_flip_greedy() -> None:
    logits = [5.0, 4.5, 0.0]  # token 0 generated twice: 5 - 2f - p against 4.5
    assert greedy_after(logits, [0, 0], frequency_penalty=0.2) == 0
    assert greedy_after(logits, [0, 0], frequency_penalty=0.3) == 1
    assert greedy_after(logits, [0, 0], presence_penalty=0.4) == 0
    assert greedy_after(logits, [0, 0], presence_penalty=0.6) == 1
    assert greedy_after(logits, [0, 0], frequency_penalty=0.1, presence_penalty=0.25) == 0
    assert greedy_after(logits, [0, 0], frequency_penalty=0.1, presence_penalty=0.35) == 1
    assert greedy_after([4.5, 4.0], [1], frequency_penalty=-1.0) == 1
    assert greedy_after([4.5, 4.0], [], presence_penalty=2.0) == 0


def test_repetition_penalty_covers_prompt_and_both_signs() -> None:
    def pick(logits: list[float], prompt: tuple[int, ...], history: list[int], penalty: float) -> int:
        request = RequestSampler(SamplingParams(temperature=0.0, repetition_penalty=penalty), prompt, 2)
        for token in history:
            request.record(token)
        return sample(torch.tensor([logits]), [request])[0].token

    assert pick([3.0, 2.0], (0,), [], 1.4) == 0  # 3 / 1.4 > 2
    assert pick([3.0, 2.0], (0,), [], 1.6) == 1  # 3 / 1.6 < 2
    assert pick([3.0, 2.0], (), [0], 1.6) == 1
    assert pick([-1.0, -1.2], (0,), [], 1.1) == 0  # -1.1 > -1.2
    assert pick([-1.0, -1.2], (0,), [], 1.3) == 1  # -1.3 < -1.2
    assert pick([2.0, -1.0], (0,), [], 0.5) == 0  # < 1 favours seen tokens
    assert pick([1.0, 1.5], (0,), [], 0.5) == 0


def test_presence_ignores_prompt_tokens() -> None:
    request = RequestSampler(SamplingParams(temperature=0.0, presence_penalty=2.0), (0,), 2)
    assert sample(torch.tensor([[4.5, 4.0]]), [request])[0].token == 0


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))  # [B, V]
    requests = [
        make(seed=1, temperature=0.8, logprobs=True, top_logprobs=5, frequency_penalty=1.0, prompt=(1, 2)),
        make(seed=2, logprobs=True, repetition_penalty=1.7, prompt=(3,)),
        make(seed=3),
    ]
    for request in requests:
        request.record(4)
    original = logits.clone()
    out = sample(logits, requests)
    assert torch.equal(logits, original)
    expected = torch.log_softmax(logits, -1)  # [B, V]
    top_vals, top_ids = expected[0].topk(5)  # [5]
    assert out[0].logprob == pytest.approx(expected[0, out[0].token].item(), abs=1e-6)
    assert [t for t, _ in out[0].top_logprobs] == top_ids.tolist()
    values = [lp for _, lp in out[0].top_logprobs]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(top_vals.tolist(), abs=1e-6)
    assert out[1].logprob == pytest.approx(expected[1, out[1].token].item(), abs=1e-6)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs == []


def test_mixed_batch_equals_each_row_alone() -> None:
    configs: list[dict] = [
        dict(temperature=0.0, frequency_penalty=0.8, prompt=(5,)),
        dict(seed=11, temperature=0.8, top_k=5),
        dict(seed=12, top_p=0.5, repetition_penalty=1.3, prompt=(1, 2, 3, 4)),
        dict(seed=13, temperature=1.7, presence_penalty=1.5, logprobs=True, top_logprobs=3),
        dict(seed=14, temperature=0.3, top_k=8, top_p=0.8, frequency_penalty=-0.5),
    ]
    steps = torch.randn(10, len(configs), V, generator=torch.Generator().manual_seed(8))  # [S, B, V]
    alone = [run(steps[:, i : i + 1], [make(**c)])[0] for i, c in enumerate(configs)]
    assert run(steps, [make(**c) for c in configs]) == alone


def test_rejects_mismatched_logits() -> None:
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, V), [make()])
    with pytest.raises(ValueError, match="vocab"):
        sample(torch.zeros(1, V + 1), [make()])
    with pytest.raises(ValueError, match="prompt"):
        make(prompt=(V,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu_behaviour() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(9))  # [B, V]
    configs: list[dict] = [
        dict(temperature=0.0, logprobs=True, top_logprobs=2),
        dict(seed=1, top_k=2),
        dict(seed=2, top_p=0.3, repetition_penalty=1.2, prompt=(0, 1)),
        dict(seed=3, frequency_penalty=0.5),
    ]
    cpu = run(logits[None], [make(**c) for c in configs])
    cuda_out = sample(logits.cuda(), [make(**c) for c in configs])
    assert cuda_out[0].token == logits[0].argmax().item()
    assert cuda_out[1].token in logits[1].topk(2).indices.tolist()
    assert run(logits[None].cuda(), [make(**c) for c in configs]) == cpu
