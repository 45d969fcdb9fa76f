"""GPT-NeoX, Falcon and MPT: dense equivalence to transformers while the stream fits, streaming
equivalence to the plain reference past capacity, position precision at 4M streamed tokens (RoPE);
ALiBi (MPT) goes through the same checks with cache-relative distances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from .helpers import make_runner, stream_logits, tiny_falcon, tiny_mpt, tiny_neox, wrap
from .reference import reference_logits

S, W = 4, 28
CAP = S + W
VOCAB = 128

VARIANTS = {
    "neox-parallel": lambda: tiny_neox(),
    "neox-sequential": lambda: tiny_neox(use_parallel_residual=False),
    "falcon-7b": lambda: tiny_falcon(),
    "falcon-40b": lambda: tiny_falcon(new_decoder_architecture=True, num_kv_heads=2),
    "falcon-40b-one-ln": lambda: tiny_falcon(
        new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, bias=True
    ),
    "falcon-sequential": lambda: tiny_falcon(multi_query=False, parallel_attn=False, bias=True),
    "mpt": lambda: tiny_mpt(),
    "mpt-6heads-clip": lambda: tiny_mpt(
        d_model=48, n_heads=6, attn_config=dict(clip_qkv=1.0, softmax_scale=0.3)
    ),
}
ROPE = [v for v in VARIANTS if not v.startswith("mpt")]


@dataclass
class Family:
    hf: Any
    model: Any
    stream: list[int]  # 3 x capacity + 11 tokens
    expected: torch.Tensor  # reference logits of the stream


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they cost 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request) -> Family:
    hf = VARIANTS[request.param]()
    model = wrap(hf)
    stream = _tokens(3 * CAP + 11, 2)
    return Family(hf, model, stream, reference_logits(model, stream, S, W))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_dense_equivalence(family, chunk):
    tokens = _tokens(CAP, 1)
    with torch.no_grad():
        expected = family.hf(torch.tensor([tokens])).logits[0]
    got = stream_logits(make_runner(family.model, S, W), tokens, chunk=chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_streaming_equivalence(family, chunk):
    got = stream_logits(make_runner(family.model, S, W), family.stream, chunk=chunk)
    torch.testing.assert_close(got, family.expected, atol=1e-4, rtol=1e-4)


def test_streaming_differs_from_dense(family):
    """Past capacity the stream is not the dense model any more: the equivalence above is not vacuous."""
    tokens = family.stream[: 2 * CAP]
    with torch.no_grad():
        dense = family.hf(torch.tensor([tokens])).logits[0]
    assert (family.expected[CAP : 2 * CAP] - dense[CAP:]).abs().max() > 1e-2


def test_exact_after_4m_tokens(family):
    """Window tokens at stream index ~4M: same logits as the reference (cache positions, no drift)."""
    tokens = family.stream[: 2 * CAP]
    got = stream_logits(make_runner(family.model, S, W), tokens, chunk=3, offset=4_000_000)
    torch.testing.assert_close(got, family.expected[: 2 * CAP], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ROPE, indirect=True)
def test_fp32_angles_would_drift_after_4m_tokens(family, monkeypatch):
    """The check above can fail: rotary angles taken in fp32 at 4M positions drift visibly."""

    def fp32_angles(pos, inv_freq, scaling, dtype):
        ang = pos.float()[:, None] * inv_freq.float()[None, :]
        ang = torch.cat((ang, ang), -1)
        return (ang.cos() * scaling).to(dtype), (ang.sin() * scaling).to(dtype)

    monkeypatch.setattr("streaming_core.attention.rope_cos_sin", fp32_angles)
    tokens = family.stream[: 2 * CAP]
    drifted = stream_logits(make_runner(family.model, S, W), tokens, chunk=3, offset=4_000_000)
    assert (drifted - family.expected[: 2 * CAP]).abs().max() > 1e-3  # 10x the tolerance above


@pytest.mark.parametrize(
    ("variant", "rotary_dim", "kv_heads"),
    [("neox-parallel", 4, 4), ("falcon-7b", 16, 1), ("falcon-40b", 16, 2), ("falcon-sequential", 16, 4)],
)
def test_rope_layout(variant, rotary_dim, kv_heads):
    """Partial rotary for NeoX (rotary_pct 0.25 of 16 features), full for Falcon; KV heads per variant."""
    model = wrap(VARIANTS[variant]())
    assert model.spec.kind == "rope"
    assert (model.spec.rotary_dim, model.kv_shape.kv_heads) == (rotary_dim, kv_heads)


def test_mpt_clip_qkv_is_applied():
    """clip_qkv changes the tiny model's output, so the dense check on 'mpt-6heads-clip' covers it."""
    hf = VARIANTS["mpt-6heads-clip"]()
    model = wrap(hf)
    tokens = _tokens(CAP, 1)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    model.clip = None
    unclipped = stream_logits(make_runner(model, S, W), tokens, chunk=64)
    assert (unclipped - expected).abs().max() > 1e-2


def test_mpt_alibi_slopes():
    model = wrap(VARIANTS["mpt-6heads-clip"]())
    assert model.spec.kind == "alibi" and model.spec.scale == pytest.approx(0.3)
    # 6 heads: of the 8-head slopes 2^-1..2^-8, every other one from 2^-2, then from 2^-1 (MPT interleave).
    expected = torch.tensor([2.0**-e for e in (2, 4, 6, 8, 1, 3)])
    torch.testing.assert_close(model.spec.alibi_slopes, expected)


def test_falcon_alibi_refused():
    with pytest.raises(ValueError, match="alibi"):
        wrap(tiny_falcon(alibi=True, multi_query=False, parallel_attn=False))


def test_mpt_qk_ln_refused():
    with pytest.raises(ValueError, match="qk_ln"):
        wrap(tiny_mpt(attn_config=dict(qk_ln=True)))
