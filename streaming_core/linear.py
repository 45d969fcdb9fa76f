"""Linear layers in the layout and kernel that run fastest for each batch size, measured at load time.

Which kernel wins depends on the rows of the call and on the machine (measured on one 2-core box:
pre-transposed fp32 beats `F.linear`'s [out, in] layout at every row count, int8 weight-only with bf16
activations wins at a few rows and loses badly at 32; a CPU with AMX changes the picture again). So
nothing is guessed: `prepare_linears` times every candidate of the configured precision on one weight
of each role (qkv, o, gate_up, ...) for each row bucket, keeps only the layouts that win somewhere,
and logs the table. The precision itself is a config choice (see `WEIGHT_MODES`), never a per-bucket
one: every kernel of a precision multiplies by the same weights, up to rounding (int4's bf16 GEMM
rounds the dequantized weights to bf16, relative 2^-9, as its other kernel rounds the activations; the
fused int8-activation kernels round each group of 32 activations to int8, as GGUF's Q8_0 does).
Where oneDNN can pack a weight in its own blocked layout (AMX, AVX512-BF16), the GEMM candidates use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from .quant import (
    int4_supported,
    pack_rows8_int4,
    pack_rows8_int8,
    pack_tiles_int4,
    pack_tiles_int8,
    quantize_int4,
    quantize_int8,
    rows8_supported,
    tiles_supported,
)

log = logging.getLogger(__name__)

WEIGHT_MODES = ("dense", "int8", "int4")
"""dense: the model dtype, exact; int8: per-channel weight-only; int4: per-group-of-32 weight-only for
the layers and int8 for the LM head (as GGUF's 4-bit files keep the output matrix at 6-8 bits)."""
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Row counts a kernel is chosen for; a call uses the bucket of the next row count up (the last beyond)."""
LOGIT_BUCKETS = ROW_BUCKETS[:7]
"""The LM head sees only rows that are sampled or scored: tuning it at prefill sizes would cost seconds."""

Kernel = Callable[[torch.Tensor], torch.Tensor]
"""x [N, in] -> [N, out] in whatever dtype the kernel computes in (bf16 for the quantized ones)."""


def bucket_index(rows: int) -> int:
    """Index into ROW_BUCKETS of the smallest bucket >= rows."""
    return min(max(rows - 1, 0).bit_length(), len(ROW_BUCKETS) - 1)


# -- kernels: (weight [out, in], bias) -> a function of x [N, in] ---------------------------------------
def _dense_nn(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    wt = w.t().contiguous()  # [in, out]: the row-major right operand BLAS streams best
    # x may arrive in bf16 (a quantized neighbour's product, see Linear.native): compute in the weight's dtype
    if b is None:
        return lambda x: torch.mm(x if x.dtype == wt.dtype else x.to(wt.dtype), wt)
    return lambda x: torch.addmm(b, x if x.dtype == wt.dtype else x.to(wt.dtype), wt)


def _dense_nt(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    w = w.contiguous()  # [out, in], what F.linear reads
    return lambda x: F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, b)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """x in bf16, without a dispatcher call when it already is (the fused decode path hands bf16 in)."""
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


# the resolved overloads: calling them skips the packet's overload lookup, ~1 us a call in a decode step
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_PACK: Any = None
_PACKED_MM: Any = None
with contextlib.suppress(AttributeError, RuntimeError):  # oneDNN's prepacked linear, absent from some builds
    _PACK = torch.ops.mkldnn._reorder_linear_weight.default
    _PACKED_MM = torch.ops.mkldnn._linear_pointwise.default


def onednn_packing(dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold a weight of `dtype` in its own blocked layout on this CPU (AMX/AVX512-BF16
    for bf16): then it reads it as stored, where `torch.mm` re-lays a plain weight out on every call
    (measured on a 2-core AMX box: bf16 gate|up at 32 rows 0.22 ms packed, 0.31 plain; the LM head at
    one row 1.3 ms packed, 3.0 plain)."""
    if _PACK is None or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _gemm(w: torch.Tensor) -> Kernel:
    """x [N, in] -> x @ w.T for w [out, in] in its own dtype (x cast to it), in oneDNN's packed layout
    where it has one, else pre-transposed for torch.mm."""
    if w.device.type != "cpu" or not onednn_packing(w.dtype):
        return _dense_nn(w, None)
    packed = _PACK(w.contiguous())
    return lambda x: _PACKED_MM(x if x.dtype == w.dtype else x.to(w.dtype), packed, None, "none", [], "")


def _with_bias(mm: Kernel, b: torch.Tensor | None) -> Kernel:
    return mm if b is None else lambda x: mm(x) + b


def _dense_packed(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    """The weight as stored, in oneDNN's layout: the same fp32 products as BLAS, summed in its order."""
    return _with_bias(_gemm(w), b)


def _int8_bf16act(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    q8 = quantize_int8(w)
    q, s = q8.q.to(w.device), q8.scales.to(device=w.device, dtype=torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = _INT8_MM(_bf16(x), q, s)  # [N, out] bf16 (Linear casts)
        return y if b is None else y + b

    return run


def _int8_codes_bf16(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    """int8 codes are exact in bf16 (|q| <= 127 fits its 8-bit mantissa), so a bf16 GEMM over them, scaled
    per output channel afterwards, multiplies by the same weights as the int8 kernel; on CPUs with AMX or
    AVX512-BF16 it is the fastest way to many rows, elsewhere the measurement rules it out."""
    q8 = quantize_int8(w)
    mm = _gemm(q8.q.to(device=w.device, dtype=torch.bfloat16))
    s = q8.scales.to(device=w.device, dtype=torch.bfloat16)
    return _with_bias(lambda x: mm(x) * s, b)  # [N, out] bf16 (Linear casts)


def _int4_kernel(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
    q4 = quantize_int4(w)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = _INT4_MM(_bf16(x), q4.packed, 32, q4.scale_zero)
        return y if b is None else y + b  # [N, out] bf16 (Linear casts)

    return run


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x as the fp32, contiguous rows the fused int8-activation kernels read."""
    return (x if x.dtype == torch.float32 else x.float()).contiguous()


def _on_fused(
    quantize: Callable[[torch.Tensor], Any],
    pack: Callable[[Any], tuple[torch.Tensor, ...]],
    mm: Callable[..., Any],
) -> Callable[[torch.Tensor, torch.Tensor | None], Kernel]:
    """A compiled int8-activation matmul (fused/decode_cpu.cpp) over `pack(quantize(w))`. Each activation
    group of 32 is rounded to int8 (scale max|x| / 127, as GGUF's Q8_0 on llama.cpp's CPU path) and
    multiplied by the quantized weights' integer codes: the same weights, activations rounded by up to
    1/254 of their group's largest value. int4_q8act_mm / int8_q8act_mm run AVX2 (or AVX-VNNI) integer
    multiply-adds with 8 output rows per vector; q8act_zmm_mm the same with AVX-512 VNNI, 16 output rows per
    vector, and q8act_amx_mm on AMX tiles, one tile instruction per 16 x 16 outputs and group: both sum the
    same integers and fold them in the same order (the same bits)."""

    def build(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
        packed = pack(quantize(w))
        return _with_bias(lambda x: mm(_f32(x), *packed), b)

    return build


def _dequantized(
    quantize: Callable[[torch.Tensor], Any],
) -> Callable[[torch.Tensor, torch.Tensor | None], Kernel]:
    """The quantized weights, dequantized once, through the fp32 GEMM: same weights, more bytes, big batches."""

    def build(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
        return _dense_nn(quantize(w).dequantized().to(device=w.device, dtype=w.dtype), b)

    return build


def _dequantized_bf16(
    quantize: Callable[[torch.Tensor], Any],
) -> Callable[[torch.Tensor, torch.Tensor | None], Kernel]:
    """The quantized weights, dequantized once and rounded to bf16, through the bf16 GEMM: on a CPU with
    AMX or AVX512-BF16 the fastest way to many rows (4-6x the fp32 GEMM at 32 rows on one such box).
    The rounding is relative 2^-9 per weight, the size of the bf16 rounding the int4 kernel already
    applies to its activations; elsewhere the measurement rules it out."""

    def build(w: torch.Tensor, b: torch.Tensor | None) -> Kernel:
        dq = quantize(w).dequantized().to(device=w.device, dtype=torch.bfloat16)
        return _with_bias(_gemm(dq), b)  # [N, out] bf16 (Linear casts)

    return build


def candidates(
    mode: str, weight: torch.Tensor, fused: ModuleType | None = None
) -> dict[str, Callable[[torch.Tensor, torch.Tensor | None], Kernel]]:
    """Kernels that compute `mode`'s weights for this weight on its device (with `fused`, the compiled
    CPU kernels, also their int8-activation matmuls)."""
    # the compiled module, where it can take this weight
    q8act = fused if weight.dtype == torch.float32 and rows8_supported(weight) else None
    tiles = q8act if q8act is not None and tiles_supported(weight) else None
    amx = tiles if tiles is not None and tiles.amx_available() else None
    zmm = tiles if tiles is not None and tiles.zmm_available() else None
    if mode == "dense":
        kernels: dict[str, Callable[[torch.Tensor, torch.Tensor | None], Kernel]] = {
            "dense-nn": _dense_nn,
            "dense-nt": _dense_nt,
        }
        if weight.device.type == "cpu" and onednn_packing(weight.dtype):
            kernels["dense-packed"] = _dense_packed
        return kernels
    if weight.device.type != "cpu":
        raise ValueError(
            f"weights mode {mode!r} uses torch's CPU kernels; use 'dense' on {weight.device.type}"
        )
    if mode == "int8":
        kernels = {
            "int8-bf16act": _int8_bf16act,
            "int8-codes-bf16": _int8_codes_bf16,
            "int8-dequant-f32": _dequantized(quantize_int8),
        }
        if q8act is not None:
            kernels["int8-q8act-f32"] = _on_fused(quantize_int8, pack_rows8_int8, q8act.int8_q8act_mm)
        if zmm is not None:
            kernels["int8-q8act-zmm-f32"] = _on_fused(quantize_int8, pack_tiles_int8, zmm.q8act_zmm_mm)
        if amx is not None:
            kernels["int8-q8act-amx-f32"] = _on_fused(quantize_int8, pack_tiles_int8, amx.q8act_amx_mm)
        return kernels
    if mode == "int4":
        if not int4_supported(weight):
            return candidates("int8", weight, fused)
        kernels = {
            "int4-bf16act": _int4_kernel,
            "int4-dequant-f32": _dequantized(quantize_int4),
            "int4-dequant-bf16": _dequantized_bf16(quantize_int4),
        }
        if q8act is not None:
            kernels["int4-q8act-f32"] = _on_fused(quantize_int4, pack_rows8_int4, q8act.int4_q8act_mm)
        if zmm is not None:
            kernels["int4-q8act-zmm-f32"] = _on_fused(quantize_int4, pack_tiles_int4, zmm.q8act_zmm_mm)
        if amx is not None:
            kernels["int4-q8act-amx-f32"] = _on_fused(quantize_int4, pack_tiles_int4, amx.q8act_amx_mm)
        return kernels
    raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {mode!r}")


def role_precision(mode: str, role: str) -> str:
    """The precision one weight role runs in under `mode`: int4 keeps the LM head at int8, since one
    4-bit rounding of the 49K-row output matrix moves every logit (GGUF's Q4 files keep it at Q6_K/Q8_0)."""
    return "int8" if mode == "int4" and role == "lm_head" else mode


class Linear:
    """One weight, callable on x [N, in] -> [N, out] with the kernel chosen for N's bucket."""

    def __init__(self, kernels: dict[str, Kernel], choice: list[str]) -> None:
        self.choice = choice
        """Kernel name per ROW_BUCKETS entry."""
        self._by_bucket = [kernels[name] for name in choice]
        self._bf16_in = [name.startswith("int") and not name.endswith("-f32") for name in choice]

    def at(self, bucket: int) -> tuple[Kernel, bool]:
        """The kernel of ROW_BUCKETS[bucket] and whether it takes bf16: for a caller that buckets once a step."""
        return self._by_bucket[bucket], self._bf16_in[bucket]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._by_bucket[bucket_index(x.shape[0])](x)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def native(self, x: torch.Tensor) -> torch.Tensor:
        """self(x) in the kernel's own dtype (bf16 for the quantized kernels): for a product that only feeds
        elementwise work and the next quantized kernel, which would cast it back to bf16 anyway."""
        return self._by_bucket[bucket_index(x.shape[0])](x)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the kernel's output taken as it comes: the add promotes a bf16 product to
        the residual's dtype exactly as a cast would, without the cast's own call."""
        return residual + self._by_bucket[bucket_index(x.shape[0])](x)


def linear(x: torch.Tensor, w: torch.Tensor | Linear, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for raw weights (models straight from a checkpoint), the tuned kernel for prepared ones."""
    if isinstance(w, Linear):
        return w(x)
    return F.linear(x, w, b)


def linear_native(x: torch.Tensor, w: torch.Tensor | Linear) -> torch.Tensor:
    """linear(x, w) in the kernel's own dtype (see Linear.native)."""
    if isinstance(w, Linear):
        return w.native(x)
    return F.linear(x, w)


def linear_add(residual: torch.Tensor, x: torch.Tensor, w: torch.Tensor | Linear) -> torch.Tensor:
    """residual + linear(x, w): a residual branch's output projection."""
    if isinstance(w, Linear):
        return w.add_to(residual, x)
    return residual + F.linear(x, w)


# -- tuning ---------------------------------------------------------------------------------------------
@dataclass
class LinearSlot:
    """Where one weight lives in a model, so that it can be replaced by its prepared `Linear`."""

    role: str
    owner: Any
    name: str
    bias_name: str | None
    index: int | None = None

    def get(self, attr: str) -> Any:
        value = getattr(self.owner, attr)
        return value if self.index is None else value[self.index]

    def set(self, attr: str, value: Any) -> None:
        if self.index is None:
            setattr(self.owner, attr, value)
        else:
            getattr(self.owner, attr)[self.index] = value


@dataclass
class KernelReport:
    """What was chosen: per role, per bucket, the winning kernel and every candidate's time (ms)."""

    mode: str
    rows: list[tuple[str, int, str, dict[str, float]]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for role, rows, best, times in self.rows:
            timing = ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            out.append(f"{role:>8} x{rows:<4} -> {best:<18} ({timing} ms)")
        return out


def _pass_ms(fns: list[Kernel], x: torch.Tensor) -> float:
    """One call of every layer's kernel in turn, in ms per call: streaming all the role's weights
    through the caches as a real forward does, rather than re-reading one hot weight."""
    t0 = time.perf_counter()
    for fn in fns:
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / len(fns)


@torch.no_grad()
def tune(
    mode: str,
    weights: list[tuple[torch.Tensor, torch.Tensor | None]],
    buckets: tuple[int, ...],
    rounds: int,
    fused: ModuleType | None = None,
) -> tuple[dict[str, list[Kernel]], list[str], list[dict[str, float]]]:
    """Per bucket, the fastest kernel for a role's weights; returns the built kernels, the choice and timings.

    Candidates are timed in interleaved rounds and scored by their best round: a noisy neighbour only
    ever adds time, and interleaving spreads its bursts over all candidates. Every candidate is timed at
    every bucket: a kernel 5x slower at one row can win at 32 (AMX's bf16 GEMM costs about the same at
    1 and 32 rows, the int4 kernel's cost grows with each row), so no early loss rules one out.
    """
    w0 = weights[0][0]
    built = {name: [make(w, b) for w, b in weights] for name, make in candidates(mode, w0, fused).items()}
    choice: list[str] = []
    timings: list[dict[str, float]] = []
    for rows in buckets:
        x = torch.randn(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
        for name in built:
            built[name][0](x)  # warm-up: first-call allocations and kernel selection
        best = dict.fromkeys(built, float("inf"))
        # Many rows are compute-bound, where caches stop mattering: a few layers tell as much as all.
        span = len(weights) if rows <= 64 else min(4, len(weights))
        for _ in range(rounds):
            for name in built:
                best[name] = min(best[name], _pass_ms(built[name][:span], x))
        winner = min(best, key=best.__getitem__)
        choice.append(winner)
        timings.append(best)
    return built, choice, timings


_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _machine_key(mode: str, by_role: dict[str, list[LinearSlot]], fused: ModuleType | None) -> str:
    """What a tuning result depends on: the CPU, torch, its threads, the precision, every role's shapes,
    this module's source and the compiled kernels' build (its directory names their source's digest), so
    a changed kernel is measured again, even under its old name."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):  # model name and flags: VMs often share a generic model name
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = " ".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    shapes = [
        (r, len(g), tuple(g[0].get(g[0].name).shape), str(g[0].get(g[0].name).device))
        for r, g in by_role.items()
    ]
    text = json.dumps(
        [
            cpu,
            os.cpu_count(),
            torch.__version__,
            torch.get_num_threads(),
            mode,
            shapes,
            _SOURCE_DIGEST,
            Path(getattr(fused, "__file__", "") or "").parent.name,
        ],
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def prepare_linears(
    slots: Iterator[LinearSlot],
    mode: str,
    rounds: int = 3,
    cache_dir: Path | None = None,
    fused: ModuleType | None = None,
) -> KernelReport:
    """Replace every slot's weight by a `Linear` whose kernel per bucket was measured on its role.

    With `cache_dir`, the measured choice is stored per machine (CPU, torch version, threads, shapes) and
    reused by later loads, so a restart neither re-measures nor picks differently on a busy moment. With
    `fused` (the compiled CPU kernels), their int8-activation matmuls are candidates too.
    """
    report = KernelReport(mode)
    by_role: dict[str, list[LinearSlot]] = {}
    for s in slots:
        by_role.setdefault(s.role, []).append(s)
    cache_file = cache_dir / f"kernels-{_machine_key(mode, by_role, fused)}.json" if cache_dir else None
    cached: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            cached = json.loads(cache_file.read_text())
    for role, group in by_role.items():
        weights = [(s.get(s.name), s.get(s.bias_name) if s.bias_name else None) for s in group]
        buckets = LOGIT_BUCKETS if role == "lm_head" else ROW_BUCKETS
        role_mode = role_precision(mode, role)
        builders = candidates(role_mode, weights[0][0], fused)
        entry = cached.get(role)
        # a choice made among other candidates (an older release's) is measured again
        if entry and len(entry["choice"]) == len(buckets) and entry.get("candidates") == sorted(builders):
            choice, timings = list(entry["choice"]), list(entry["timings"])
            built = {n: [builders[n](w, b) for w, b in weights] for n in set(choice)}
        else:
            built, choice, timings = tune(role_mode, weights, buckets, rounds, fused)
            cached[role] = {"choice": list(choice), "timings": timings, "candidates": sorted(builders)}
        for rows, best, times in zip(buckets, choice, timings, strict=True):
            report.rows.append((role, rows, best, times))
        choice += [choice[-1]] * (len(ROW_BUCKETS) - len(choice))
        for i, s in enumerate(group):
            kernels = {name: built[name][i] for name in set(choice)}
            s.set(s.name, Linear(kernels, choice))
            if s.bias_name:
                s.set(s.bias_name, None)
        del built  # the losing layouts go now
    if cache_file is not None:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cached))
            tmp.replace(cache_file)
    for line in report.lines():
        log.info("kernel %s", line)
    return report
