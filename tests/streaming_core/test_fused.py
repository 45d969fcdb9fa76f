"""The fused CPU decode kernels (streaming_core/fused) compute what the eager decode path computes.

Two pools follow the same teacher-forced streams, one stepping through the eager ops and one through the
kernels: logits and every KV entry stay equal (up to summation order, and to one bf16 rounding fewer in
SiLU-and-multiply where the weights are quantized), across fill buckets, eviction, slots that are not a
contiguous range, per-session sink counts and bf16 KV.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streaming_core import fused
from streaming_core import linear as lin
from streaming_core.attention import StepContext
from streaming_core.batch import BatchPlan, SeqChunk
from streaming_core.config import CacheConfig
from streaming_core.kv_pool import KVPool
from streaming_core.models import build_model
from streaming_core.quant import (
    pack_rows8_int4,
    pack_rows8_int8,
    pack_tiles_int4,
    pack_tiles_int8,
    quantize_int4,
    quantize_int8,
)
from streaming_core.runner import ModelRunner

from .helpers import make_runner, stream_logits, tiny_llama
from .test_linear import _snap_to_q4_1

CACHE = CacheConfig(sink_tokens=4, window=28, num_slots=4)


@pytest.fixture(scope="module")
def kernels(streamllm_data_dir: Path):
    reason = fused.unavailable_reason()
    if reason is not None:
        pytest.skip(f"fused kernels cannot be built here: {reason}")
    module = fused.load(streamllm_data_dir / "torch-extensions")
    assert module is not None, "a machine with a compiler and AVX2 must build the kernels (see the log)"
    return module


def _step(model, pool: KVPool, decode: list[SeqChunk], prefill: list[SeqChunk], kernels) -> torch.Tensor:
    ids = torch.tensor([t for c in decode + prefill for t in c.tokens])  # [N]
    ctx = StepContext(pool, model.spec, decode, prefill, kernels)
    assert (ctx.fused is not None) == (kernels is not None and not prefill)
    with torch.inference_mode():
        hidden = model.forward(ids, ctx)
        ctx.finish(prefill)
        return model.project(hidden)  # [N, V]


def _token(slot: int, t: int) -> int:
    return (7 * slot + 3 * t * t + 11) % 128


def pin_matmuls(monkeypatch, kind: str | None) -> None:
    """Every quantized weight on the `<precision>-<kind>` kernel at every bucket instead of what the tuner
    measures fastest on this machine, so that the comparison does not depend on which kernels won here.
    Kernels with bf16 products round the logits to bf16 (one ulp is 2^-5 at 4); the int8-activation ones
    round each activation to int8, so a last-bit difference upstream (the fused RMSNorm's summation order)
    now and then moves an activation by a whole step, and with it every later token through the KV (int4
    weights, bf16 KV: logits up to 0.12 apart). Their integer math is held to its reference bit for bit
    by the tile-kernel tests; here the matmuls are the exact dequantized ones, or bf16 at bf16 tolerance."""
    if kind is None:
        return

    def tune(mode, weights, buckets, rounds, fused=None):
        built = {
            n: [make(w, b) for w, b in weights]
            for n, make in lin.candidates(mode, weights[0][0], fused).items()
        }
        name = f"{mode}-{kind}"
        assert name in built, f"{name} is not a candidate here ({sorted(built)})"
        return built, [name] * len(buckets), [dict.fromkeys(built, 0.0) for _ in buckets]

    monkeypatch.setattr(lin, "tune", tune)


@pytest.mark.parametrize(
    ("weights", "matmuls", "kv_dtype", "tol"),
    [
        ("dense", None, torch.float32, 2e-5),
        ("dense", None, torch.bfloat16, 2e-3),  # a key 1 fp32 ulp off may round to the other bf16 neighbour
        ("int8", "dequant-f32", torch.float32, 1e-3),
        ("int4", "dequant-f32", torch.float32, 1e-3),
        ("int4", "dequant-f32", torch.bfloat16, 3e-3),  # bf16 KV: the engine's default on the CPU
        ("int4", "bf16act", torch.bfloat16, 0.1),  # bf16 products: logits within a few bf16 roundings
    ],
)
def test_fused_decode_equals_eager(kernels, streamllm_data_dir, monkeypatch, weights, matmuls, kv_dtype, tol):
    pin_matmuls(monkeypatch, matmuls)
    model = build_model(tiny_llama(), torch.float32, "cpu")
    model.prepare(weights, fused_dir=streamllm_data_dir / "torch-extensions")
    pools = [KVPool(CACHE, model.kv_shape, torch.float32, torch.device("cpu"), kv_dtype) for _ in range(2)]
    slots, sinks = [0, 2, 3], {0: None, 2: 2, 3: 0}  # a gap in the slots; the pool's 4 sinks, 2 and none
    prompt = 5
    prefill = [SeqChunk(s, 0, tuple(_token(s, t) for t in range(prompt)), sinks=sinks[s]) for s in slots]
    for pool in pools:
        _step(model, pool, [], prefill, None)
    # 55 decode steps: extents cross the 16- and 32-entry buckets, then the 32-entry slots evict
    for t in range(prompt, prompt + 55):
        decode = [SeqChunk(s, t, (_token(s, t),), sinks=sinks[s]) for s in slots]
        want = _step(model, pools[0], decode, [], None)
        got = _step(model, pools[1], decode, [], kernels)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, t=t: f"stream index {t}: {m}")
    eager, fast = pools
    torch.testing.assert_close(fast.pos, eager.pos)
    kv_tol = max(tol, 8e-3) if kv_dtype == torch.bfloat16 else tol  # one bf16 ulp
    torch.testing.assert_close(fast.k.float(), eager.k.float(), atol=kv_tol, rtol=kv_tol)
    torch.testing.assert_close(fast.v.float(), eager.v.float(), atol=kv_tol, rtol=kv_tol)


def test_fused_decode_without_sinks(kernels):
    """A pool without sinks scores every entry with the window query (no second rotation)."""
    model = build_model(tiny_llama(seed=1), torch.float32, "cpu")
    model.prepare("dense")
    cache = CacheConfig(sink_tokens=0, window=32, num_slots=2)
    pools = [KVPool(cache, model.kv_shape, torch.float32, torch.device("cpu")) for _ in range(2)]
    for t in range(40):
        decode = [SeqChunk(s, t, (_token(s, t),)) for s in (0, 1)]
        want = _step(model, pools[0], decode, [], None)
        torch.testing.assert_close(_step(model, pools[1], decode, [], kernels), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("weights", "matmuls"), [("dense", None), ("int4", "dequant-f32")])
def test_prompt_chunks_run_as_rows_equal_the_prefill(
    kernels, streamllm_data_dir, monkeypatch, weights, matmuls
):
    """The runner takes short prompt chunks that evict nothing as decode rows on the kernels: a fresh
    prompt, one onto a filled slot, one with logits for every token and one under its own sink count,
    next to plain decode rows. Logits and KV equal the eager prefill's; a step with a chunk that wraps the
    ring runs all of it as a prefill."""
    fast_model = build_model(tiny_llama(), torch.float32, "cpu")
    eager_model = build_model(tiny_llama(), torch.float32, "cpu")
    pin_matmuls(monkeypatch, matmuls)
    for m in (fast_model, eager_model):
        m.prepare(weights, fused_dir=streamllm_data_dir / "torch-extensions")
    eager_model.fused = None
    fast_model.fused = kernels
    cap = CACHE.capacity
    runners = [
        ModelRunner(m, KVPool(CACHE, m.kv_shape, torch.float32, torch.device("cpu")))
        for m in (fast_model, eager_model)
    ]
    fast, eager = runners

    def both(plan: BatchPlan, rows: bool) -> None:
        assert fast._all_rowable(plan.chunks) is rows
        assert not eager._all_rowable(plan.chunks)
        got, want = fast.run(plan), eager.run(plan)
        assert got.logits.keys() == want.logits.keys()
        for i in want.logits:
            torch.testing.assert_close(got.logits[i], want.logits[i], atol=1e-3, rtol=1e-3)

    toks = lambda s, a, b: tuple(_token(s, t) for t in range(a, b))  # noqa: E731
    both(BatchPlan((SeqChunk(0, 0, toks(0, 0, 12), "none"), SeqChunk(1, 0, toks(1, 0, 3), "last"))), True)
    both(
        BatchPlan(
            (
                SeqChunk(1, 3, toks(1, 3, 4)),  # a decode row
                SeqChunk(0, 12, toks(0, 12, 20), "last"),  # onto a filled slot
                SeqChunk(2, 0, toks(2, 0, 9), "all"),  # every token's logits (perplexity)
                SeqChunk(3, 0, toks(3, 0, 7), "last", sinks=2),  # its own sink count
            )
        ),
        True,
    )
    both(
        BatchPlan((SeqChunk(0, 20, toks(0, 20, cap + 3), "last"), SeqChunk(1, 4, toks(1, 4, 6), "last"))),
        False,
    )
    for t in range(cap + 3, cap + 8):  # the streams go on by plain decode
        both(BatchPlan(tuple(SeqChunk(s, n, toks(s, n, n + 1)) for s, n in ((0, t), (1, t - cap + 3)))), True)
    torch.testing.assert_close(fast.pool.pos, eager.pool.pos)
    torch.testing.assert_close(fast.pool.k, eager.pool.k, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fast.pool.v, eager.pool.v, atol=1e-3, rtol=1e-3)


def test_kernels_match_their_torch_formulas(kernels):
    """RMSNorm with the residual add, and SiLU-and-multiply, against torch, in fp32 and bf16 outputs."""
    torch.manual_seed(0)
    x, y, w = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96)
    want = torch.rms_norm(x + y, [96], w, 1e-5)
    residual = x.clone()
    torch.testing.assert_close(kernels.add_rms_norm_(residual, y, w, 1e-5, False), want)
    torch.testing.assert_close(residual, x + y)  # updated in place
    got = kernels.add_rms_norm_(x.clone(), y.bfloat16(), w, 1e-5, True)
    assert got.dtype == torch.bfloat16
    want_bf = torch.rms_norm(x + y.bfloat16().float(), [96], w, 1e-5).bfloat16()
    torch.testing.assert_close(got, want_bf, atol=0, rtol=0)
    gu = torch.randn(3, 2 * 100) * 6  # 100 features: the vector loop and its scalar tail
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gu.contiguous()), torch.nn.functional.silu(gate) * up)
    gb = gu.bfloat16()
    ref = (torch.nn.functional.silu(gb.float()[:, :100]) * gb.float()[:, 100:]).bfloat16()
    torch.testing.assert_close(kernels.silu_mul(gb), ref, atol=0, rtol=0)


def test_unavailable_machine_gets_the_eager_path(monkeypatch, tmp_path):
    """STREAMLLM_FUSED=0 (or no compiler, no AVX2) loads nothing; a step then runs the eager ops."""
    monkeypatch.setenv("STREAMLLM_FUSED", "0")
    assert fused.unavailable_reason() == "disabled by STREAMLLM_FUSED=0"
    assert fused.load(tmp_path / "off") is None
    model = build_model(tiny_llama(), torch.float32, "cpu")
    model.prepare("dense", fused_dir=tmp_path / "off")
    assert model.fused is None


def test_prebuilt_copy_loads_without_a_compiler(kernels, monkeypatch, streamllm_data_dir, tmp_path):
    """An image ships the kernels built by its build stage and no compiler: the copy is imported as is,
    and a root without one gives the eager path."""
    monkeypatch.setattr(fused, "_loaded", {})
    monkeypatch.setattr(fused.shutil, "which", lambda *_a, **_k: None)  # no c++, no ninja
    module = fused.load(streamllm_data_dir / "torch-extensions")
    assert module is not None and callable(module.attend)
    assert fused.load(tmp_path / "empty") is None


def _q8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] quantized as the kernels do: per group of 32, codes round(x / d) with d = max|x| / 127
    (ties to even, as the CPU rounds); returns the codes [M, G, 32] and d [M, G, 1] in float64."""
    g = x.double().view(x.shape[0], -1, 32)
    d = g.abs().amax(-1, keepdim=True).float().double() / 127  # the kernel divides in fp32
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d.float())).double()
    return torch.round((g.float() * inv.float()).double()), d


@pytest.fixture(params=["avx2", "avxvnni"])
def int8_dot_isa(request, kernels):
    """Runs a test with the int8-activation matmuls on AVX2, then on AVX-VNNI where the CPU has it."""
    default = kernels.int8_dot_isa()
    if kernels.int8_dot_isa(request.param == "avxvnni") != request.param:
        kernels.int8_dot_isa(default == "avxvnni")
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    kernels.int8_dot_isa(default == "avxvnni")


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])  # each row template, and rows in chunks of 4
def test_int8_activation_matmuls_equal_their_integer_formula(kernels, int8_dot_isa, rows):
    """int4_q8act_mm / int8_q8act_mm compute sum over groups of (codes . quantized x) * scales (+ the int4
    offset times the exact group sum of x): the same numbers, from an independent formula, to fp32
    rounding; so the only approximation is the activations' rounding, bounded in the next test."""
    torch.manual_seed(rows)
    n, k = 48, 96  # 6 blocks of 8 output rows, 3 groups of 32 inputs
    w, x = torch.randn(n, k), torch.randn(rows, k) * 3
    x[0, :32] = 0.0  # an all-zero group: scale 0, no division by it
    xq, d = _q8_groups(x)  # [M, G, 32], [M, G, 1]
    q4 = quantize_int4(w)
    sz = q4.scale_zero.double().transpose(0, 1)  # [N, G, 2]
    c = q4.codes.double().view(n, -1, 32) - 8  # [N, G, 32]
    dots = torch.einsum("ngk,mgk->mng", c, xq)  # [M, N, G]
    sums = x.double().view(rows, -1, 32).sum(-1)  # [M, G]
    want4 = (dots * sz[None, :, :, 0] * d[:, None, :, 0]).sum(-1) + torch.einsum(
        "ng,mg->mn", sz[..., 1], sums
    )
    got4 = kernels.int4_q8act_mm(x, *pack_rows8_int4(q4)).double()
    torch.testing.assert_close(got4, want4, atol=1e-4 * want4.abs().max().item(), rtol=1e-5)
    q8 = quantize_int8(w)
    dots8 = torch.einsum("ngk,mgk->mng", q8.q.double().view(n, -1, 32), xq)
    want8 = (dots8 * d[:, None, :, 0]).sum(-1) * q8.scales.double()
    got8 = kernels.int8_q8act_mm(x, *pack_rows8_int8(q8)).double()
    torch.testing.assert_close(got8, want8, atol=1e-4 * want8.abs().max().item(), rtol=1e-5)


def test_int8_activation_matmuls_stay_near_the_exact_product(kernels):
    """Against the quantized weights times unrounded x, the activations' rounding costs about half a
    percent (1/254 of each group's largest value per element), as GGUF's Q8_0 does."""
    torch.manual_seed(0)
    w, x = torch.randn(256, 576) * 0.05, torch.randn(4, 576)
    q4, q8 = quantize_int4(w), quantize_int8(w)
    for kind, got, exact in (
        ("int4", kernels.int4_q8act_mm(x, *pack_rows8_int4(q4)), q4.dequantized()),
        ("int8", kernels.int8_q8act_mm(x, *pack_rows8_int8(q8)), q8.dequantized()),
    ):
        want = x.double() @ exact.double().T
        err = ((got.double() - want).norm() / want.norm()).item()
        assert 1e-4 < err < 1e-2, f"{kind}: relative error {err:.4f}"


def test_a_model_on_the_int8_activation_kernels_stays_close_to_dense(
    kernels, monkeypatch, streamllm_data_dir
):
    """Every matmul on the int8-activation kernels (prefill rows and fused decode steps alike) keeps the
    logits near the dense model's and the argmax, on Q4_1-grid layers (what int4 holds exactly)."""
    real = lin.candidates

    def only_q8act(mode, weight, fused_kernels=None):
        found = real(mode, weight, fused_kernels)
        return {k: v for k, v in found.items() if k.endswith("q8act-f32")}

    monkeypatch.setattr(lin, "candidates", only_q8act)
    hf = tiny_llama()
    _snap_to_q4_1(hf)
    dense, quant = build_model(hf, torch.float32, "cpu"), build_model(hf, torch.float32, "cpu")
    report = quant.prepare("int4", fused_dir=streamllm_data_dir / "torch-extensions")
    assert quant.fused is not None
    assert {best for _, _, best, _ in report.rows} == {"int4-q8act-f32", "int8-q8act-f32"}
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    want = stream_logits(make_runner(dense, 4, 28), tokens)  # [T, V]
    got = stream_logits(make_runner(quant, 4, 28), tokens)
    err = (got - want).abs().mean() / want.std()
    assert err < 0.05, f"mean error {err:.3f} of the logits' std"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_avx2_and_vnni_sum_the_same_integers(kernels):
    """VNNI's dot product and AVX2's maddubs/madd chain add the same exact integer products: the outputs
    are bit for bit equal (so which one a machine runs changes nothing)."""
    default = kernels.int8_dot_isa()
    if kernels.int8_dot_isa(True) != "avxvnni":
        pytest.skip("this CPU has no AVX-VNNI")
    try:
        torch.manual_seed(0)
        w, x = torch.randn(64, 576) * 0.05, torch.randn(6, 576)
        q4, q8 = pack_rows8_int4(quantize_int4(w)), pack_rows8_int8(quantize_int8(w))
        vnni = kernels.int4_q8act_mm(x, *q4), kernels.int8_q8act_mm(x, *q8)
        assert kernels.int8_dot_isa(False) == "avx2"
        avx2 = kernels.int4_q8act_mm(x, *q4), kernels.int8_q8act_mm(x, *q8)
        assert torch.equal(vnni[0], avx2[0]) and torch.equal(vnni[1], avx2[1])
    finally:
        kernels.int8_dot_isa(default == "avxvnni")


TILE_KERNELS = {"amx": ("amx_available", "q8act_amx_mm"), "zmm": ("zmm_available", "q8act_zmm_mm")}


@pytest.fixture(params=sorted(TILE_KERNELS))
def tiles(request, kernels):
    """The matmuls over the tile layout: on AMX tiles, and with AVX-512 VNNI (each where the CPU runs it)."""
    available, mm = TILE_KERNELS[request.param]
    if not getattr(kernels, available)():
        pytest.skip(f"this CPU (or kernel) does not run {mm}")
    return getattr(kernels, mm)


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 17, 40])  # part of a block, one, one and a row, several
def test_tile_kernels_give_the_avx2_kernels_bits(kernels, tiles, rows):
    """q8act_amx_mm and q8act_zmm_mm sum the same integer products per group and fold them into fp32 in the
    same order as int4_q8act_mm / int8_q8act_mm: bit for bit the same outputs, for any number of rows (the
    AMX tiles take 16, the AVX-512 loops 8 at a time) and an odd number of 16-column output tiles (48
    outputs: a pair and a single)."""
    torch.manual_seed(rows)
    w, x = torch.randn(48, 96), torch.randn(rows, 96) * 3
    x[0, 32:64] = 0.0  # an all-zero group
    w[1, :40] = -w[1, :40].abs()  # int8 codes of -127 in a row (the AVX-512 loops shift x by 128)
    q4, q8 = quantize_int4(w), quantize_int8(w)
    assert torch.equal(tiles(x, *pack_tiles_int4(q4)), kernels.int4_q8act_mm(x, *pack_rows8_int4(q4)))
    assert torch.equal(tiles(x, *pack_tiles_int8(q8)), kernels.int8_q8act_mm(x, *pack_rows8_int8(q8)))


def test_tile_kernels_check_their_layout(tiles):
    """Codes that are not in the tile layout, or scales of the wrong size, are refused, not misread."""
    w, x = torch.randn(32, 64), torch.randn(2, 64)
    codes, scale, zero = pack_tiles_int4(quantize_int4(w))
    with pytest.raises(RuntimeError, match="codes"):
        tiles(x, codes.view(2, 2, 256), scale, zero)
    with pytest.raises(RuntimeError, match="codes"):  # int8 codes with an int4 zero: not int4's layout
        tiles(x, pack_tiles_int8(quantize_int8(w))[0], scale, zero)
    with pytest.raises(RuntimeError, match="scale"):
        tiles(x, codes, scale[:1], zero)
    with pytest.raises(RuntimeError, match="K a multiple of 32"):
        tiles(torch.randn(2, 48), codes, scale, zero)


@pytest.mark.parametrize("kind", sorted(TILE_KERNELS))
def test_the_tuner_offers_tile_kernels_exactly_where_they_run(kernels, kind):
    """The AMX and AVX-512 candidates are offered for tile-shaped fp32 weights on a CPU that runs them, and
    only there."""
    w, available = torch.randn(64, 96), getattr(kernels, TILE_KERNELS[kind][0])()
    for mode in ("int4", "int8"):
        name = f"{mode}-q8act-{kind}-f32"
        assert (name in lin.candidates(mode, w, kernels)) == available
        assert name not in lin.candidates(mode, torch.randn(40, 96), kernels)  # 40 outputs: not whole tiles
        assert name not in lin.candidates(mode, w)  # no compiled module


def test_bf16_outputs_round_as_torch(kernels):
    """The kernels' vectorised bf16 stores round to nearest even exactly as torch's fp32 -> bf16 cast:
    RMSNorm written in bf16 equals RMSNorm written in fp32 and cast, bit for bit, over random finite bit
    patterns (ties, subnormals, huge values) and ordinary activations."""
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 4096), generator=torch.Generator().manual_seed(0))
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.nan_to_num(x, nan=1.0, posinf=1.0, neginf=1.0).clamp(-1e30, 1e30)
    for rows in (x, torch.randn(5, 576) * 3):
        gain = torch.ones(rows.shape[1])
        as_bf16 = kernels.add_rms_norm_(rows.clone(), None, gain, 0.0, True)
        cast = kernels.add_rms_norm_(rows.clone(), None, gain, 0.0, False).to(torch.bfloat16)
        assert torch.equal(as_bf16.view(torch.int16), cast.view(torch.int16))


def test_argmax_rows_picks_what_torch_picks(kernels):
    """argmax_rows is torch.argmax(dim=-1): the first of equal maxima (within a lane and across lanes),
    the first NaN where a row has one, index 0 for an all -inf row, for widths below, at and past 8 lanes."""
    for v in (1, 5, 8, 13, 64, 49152 + 3):
        x = torch.randn(7, v, generator=torch.Generator().manual_seed(v))
        x[1] = x[1].round()  # many ties
        x[2] = float("-inf")
        x[3, v // 2] = float("nan")
        x[4, -1] = float("nan")
        x[5, v // 3] = x[5, -1] = x[5].max() + 1  # the same maximum twice
        x[6] = 0.0
        assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1)), v
