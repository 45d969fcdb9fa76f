"""Kernels per batch bucket: every kernel of a precision computes that precision's weights, the choice is
measured and cached per machine, and quantized models stay close to the dense one."""

from __future__ import annotations

import json

import pytest
import torch

from streaming_core import linear as lin
from streaming_core.linear import ROW_BUCKETS, Linear, bucket_index, candidates
from streaming_core.models import build_model
from streaming_core.quant import quantize_int4, quantize_int8

from .helpers import make_runner, stream_logits, tiny_llama


def drive(model, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of a token stream through a 4+28 slot, past its capacity."""
    return stream_logits(make_runner(model, 4, 28), tokens)


def test_bucket_index_rounds_up_and_saturates():
    assert [ROW_BUCKETS[bucket_index(n)] for n in (1, 2, 3, 4, 5, 16, 17, 256)] == [
        1,
        2,
        4,
        4,
        8,
        16,
        32,
        256,
    ]
    assert bucket_index(10_000) == len(ROW_BUCKETS) - 1


@pytest.mark.parametrize("mode", ["dense", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_every_kernel_of_a_precision_multiplies_by_the_same_weights(mode, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 64)
    exact = {"dense": w, "int8": quantize_int8(w).dequantized(), "int4": quantize_int4(w).dequantized()}[mode]
    want = x @ exact.T + b
    for name, build in candidates(mode, w).items():
        got = build(w, b)(x)
        # bf16 activations round x to 8 bits of mantissa; fp32 paths only reorder the sums
        tol = 2e-2 if "bf16" in name else 1e-4
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol, msg=name)


def test_int4_holds_a_q4_1_weight_up_to_the_bf16_offset():
    """GGUF Q4_1 blocks of 32 (scale d, minimum m, codes 0..15) land on the int4 grid with the same codes;
    only the kernel's bf16 offset (m + 8d) rounds, by at most half a bf16 ulp of it."""
    torch.manual_seed(1)
    d = (torch.rand(16, 2, 1) + 0.01).to(torch.bfloat16).float()  # bf16-representable, as the kernel stores
    m = torch.randn(16, 2, 1)
    codes = torch.randint(0, 16, (16, 2, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 puts the block's minimum and maximum on the grid
    w = (d * codes + m).view(16, 64)
    q4 = quantize_int4(w)
    assert torch.equal(q4.codes.view(16, 2, 32).float(), codes)
    offset = m + 8 * d  # [16, 2, 1]
    bound = (offset.abs() * 2.0**-8 + 1e-6).expand(16, 2, 32).reshape(16, 64)
    assert ((q4.dequantized() - w).abs() <= bound).all()


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    first = build_model(tiny_llama(), torch.float32, "cpu")
    report = first.prepare("int8", cache_dir=tmp_path)
    assert {r[0] for r in report.rows} == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert all(
        best in times and min(times, key=times.__getitem__) == best for _, _, best, times in report.rows
    )
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached choice must not be measured again")

    monkeypatch.setattr(lin, "tune", no_timing)
    second = build_model(tiny_llama(), torch.float32, "cpu")
    assert [r[:3] for r in second.prepare("int8", cache_dir=tmp_path).rows] == [r[:3] for r in report.rows]


def test_dense_prepared_model_equals_the_plain_one():
    plain = build_model(tiny_llama(), torch.float32, "cpu")
    prepared = build_model(tiny_llama(), torch.float32, "cpu")
    prepared.prepare("dense")
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    torch.testing.assert_close(drive(prepared, tokens), drive(plain, tokens), atol=1e-5, rtol=1e-5)


def _snap_to_q4_1(hf_model) -> None:
    """Put every layer matmul weight on a GGUF Q4_1 grid (blocks of 32: codes 0..15 between the block's
    minimum and maximum), as the embedded model's weights are, and the LM head on an 8-bit grid (the
    GGUF keeps it at Q8_0; int4 mode runs it at int8)."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name == "lm_head.weight":
                scale = p.abs().amax(dim=1, keepdim=True) / 127
                p.copy_(torch.round(p / scale) * scale)
            elif p.dim() == 2 and "embed" not in name:
                g = p.view(p.shape[0], -1, 32)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                d = (hi - lo) / 15
                g.copy_(torch.round((g - lo) / d) * d + lo)


def _assert_close_to_dense(hf, mode: str) -> None:
    dense = build_model(hf, torch.float32, "cpu")
    quant = build_model(hf, torch.float32, "cpu")
    quant.prepare(mode)
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    want, got = drive(dense, tokens), drive(quant, tokens)  # [T, V]
    err = (got - want).abs().mean() / want.std()
    assert err < 0.05, f"mean error {err:.3f} of the logits' std"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85  # a random tiny model has near-ties


def test_int8_model_stays_close_to_dense():
    """Weight-only int8 moves the logits by a small fraction of their spread and keeps the argmax."""
    _assert_close_to_dense(tiny_llama(), "int8")


def test_int4_model_of_q4_1_weights_stays_close_to_dense():
    """On Q4_1-grid layers and an 8-bit head (the GGUF's), int4 differs from dense only by the bf16 scales,
    offsets and activations."""
    hf = tiny_llama()
    _snap_to_q4_1(hf)
    _assert_close_to_dense(hf, "int4")


@pytest.mark.parametrize("kernel", ["int8-bf16act", "int8-codes-bf16", "int8-dequant-f32"])
def test_every_int8_kernel_takes_a_bf16_product(kernel: str) -> None:
    """gate|up hands the down projection its bf16 product (Linear.native): whichever kernel the tuning
    chose for a bucket must take it (the dequantized fp32 GEMM once failed a server's step on it)."""
    torch.manual_seed(0)
    w = torch.randn(24, 64)  # torch's int8 CPU kernel wants the inner size in blocks of 64
    layer = Linear({kernel: candidates("int8", w)[kernel](w, None)}, [kernel] * len(ROW_BUCKETS))
    x = torch.randn(3, 64)
    residual = torch.randn(3, 24)
    want = layer.add_to(residual, x)
    got = layer.add_to(residual, x.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    assert layer.native(x.bfloat16()).shape == (3, 24)


def test_a_choice_made_among_other_candidates_is_measured_again(tmp_path, monkeypatch):
    """A cache written when the precision had other kernels (an older release) must not pin the old choice."""
    build_model(tiny_llama(), torch.float32, "cpu").prepare("int8", cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("kernels-*.json")
    stale = {
        role: {**e, "candidates": ["int8-bf16act"]} for role, e in json.loads(cache_file.read_text()).items()
    }
    cache_file.write_text(json.dumps(stale))
    measured: list[str] = []
    real_tune = lin.tune

    def counting_tune(mode, *args):
        measured.append(mode)
        return real_tune(mode, *args)

    monkeypatch.setattr(lin, "tune", counting_tune)
    build_model(tiny_llama(), torch.float32, "cpu").prepare("int8", cache_dir=tmp_path)
    assert len(measured) == len(stale)
    assert all(
        e["candidates"] == sorted(candidates("int8", torch.zeros(8, 8)))
        for e in json.loads(cache_file.read_text()).values()
    )
