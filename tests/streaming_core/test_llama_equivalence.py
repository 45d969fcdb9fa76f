"""Core invariants on the Llama family: dense equivalence to transformers, streaming equivalence to
the plain reference, position precision at 4M streamed tokens."""

from __future__ import annotations

import pytest
import torch

from streaming_core import positions

from .helpers import make_runner, stream_logits, tiny_llama, wrap
from .reference import reference_logits

S, W = 4, 28
CAP = S + W


@pytest.fixture(scope="module")
def hf():
    return tiny_llama()


@pytest.fixture(scope="module")
def model(hf):
    return wrap(hf)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_dense_equivalence(hf, model, chunk):
    tokens = torch.randint(0, 128, (CAP,), generator=torch.Generator().manual_seed(1))
    expected = hf(tokens[None]).logits[0]
    got = stream_logits(make_runner(model, S, W), tokens.tolist(), chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_streaming_equivalence(model, chunk):
    tokens = torch.randint(0, 128, (3 * CAP + 11,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = reference_logits(model, tokens, S, W)
    got = stream_logits(make_runner(model, S, W), tokens, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_streaming_differs_from_dense(hf, model):
    """The check above can fail: past capacity the stream is not the dense model any more."""
    tokens = torch.randint(0, 128, (2 * CAP,), generator=torch.Generator().manual_seed(3))
    dense = hf(tokens[None]).logits[0]
    got = stream_logits(make_runner(model, S, W), tokens.tolist(), chunk=1)
    assert (got[CAP:] - dense[CAP:]).abs().max() > 1e-2


def test_position_precision_after_4m_tokens(model, monkeypatch):
    tokens = torch.randint(0, 128, (2 * CAP,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = reference_logits(model, tokens, S, W)
    offset = 4_000_000
    got = stream_logits(make_runner(model, S, W), tokens, chunk=3, offset=offset)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # The same stream with angles taken in fp32 drifts: this test would catch a regression to that.
    def fp32_angles(pos, inv_freq, scaling, dtype):
        ang = pos.float()[:, None] * inv_freq.float()[None, :]
        ang = torch.cat((ang, ang), -1)
        return (ang.cos() * scaling).to(dtype), (ang.sin() * scaling).to(dtype)

    monkeypatch.setattr("streaming_core.attention.rope_cos_sin", fp32_angles)
    drifted = stream_logits(make_runner(model, S, W), tokens, chunk=3, offset=offset)
    assert (drifted - expected).abs().max() > 1e-2
    assert positions.rope_cos_sin is not fp32_angles


def test_per_session_sinks_in_one_batch(model):
    """A session with widened sinks (a pinned system prompt) and one with the pool's default decode in
    the same forward, each equal to the reference with its own sinks and window."""
    from streaming_core.batch import BatchPlan, SeqChunk

    runner = make_runner(model, S, W)
    wide = 11
    a = torch.randint(0, 128, (3 * CAP,), generator=torch.Generator().manual_seed(5)).tolist()
    b = torch.randint(0, 128, (3 * CAP,), generator=torch.Generator().manual_seed(6)).tolist()
    got_a, got_b = [], []
    for t in range(3 * CAP):
        out = runner.run(
            BatchPlan((SeqChunk(0, t, (a[t],), "last"), SeqChunk(1, t, (b[t],), "last", sinks=wide)))
        )
        got_a.append(out.logits[0])
        got_b.append(out.logits[1])
    torch.testing.assert_close(torch.cat(got_a), reference_logits(model, a, S, W), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        torch.cat(got_b), reference_logits(model, b, wide, CAP - wide), atol=1e-4, rtol=1e-4
    )
    # chunked prefill honours the widened sinks too
    chunked = make_runner(model, S, W)
    rows = [
        chunked.run(BatchPlan((SeqChunk(2, i, tuple(b[i : i + 9]), "all", sinks=wide),))).logits[0]
        for i in range(0, 3 * CAP, 9)
    ]
    torch.testing.assert_close(
        torch.cat(rows), reference_logits(model, b, wide, CAP - wide), atol=1e-4, rtol=1e-4
    )
