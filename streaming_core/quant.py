"""Weight-only quantization for the CPU kernels torch ships: int8 per output channel, int4 per group.

Every kernel of one precision computes with the same quantized weights (`dequantized` returns exactly
what the packed kernels multiply by), so the choice of kernel per batch size changes rounding at most:
of the activations (bf16, or int8 per group of 32 in the fused kernels, `pack_rows8_*`), and for int4's
bf16 GEMM (linear.py) of the dequantized weights, by the same relative 2^-9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 32
"""Inputs per int4 group: the block size of GGUF's Q4_0/Q4_1, so a Q4_1 weight is represented exactly
(its block minimum and maximum are on the grid) up to the bf16 rounding of the scale and offset."""


@dataclass(frozen=True)
class Int8Weight:
    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] fp32

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]  # [out, in]


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # the kernel's own packed layout of [out, in] nibbles
    scale_zero: torch.Tensor  # [in / group, out, 2] bf16: w = (q - 8) * scale + zero
    codes: torch.Tensor  # [out, in] uint8 in 0..15, kept to rebuild the exact dequantized weight

    def dequantized(self) -> torch.Tensor:
        out, k = self.codes.shape
        sz = self.scale_zero.float().transpose(0, 1)  # [out, in / group, 2]
        q = self.codes.view(out, k // INT4_GROUP, INT4_GROUP).float() - 8  # [out, groups, group]
        return (q * sz[..., :1] + sz[..., 1:]).view(out, k)  # [out, in]


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8: w ~ q * scale, |q| <= 127."""
    w = w.detach().float().cpu()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales)


def int4_supported(w: torch.Tensor) -> bool:
    """torch's CPU int4 kernel wants whole groups along the input and outputs in multiples of 16."""
    out, k = w.shape
    return k % INT4_GROUP == 0 and out % 16 == 0


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Asymmetric int4 per group of 32 inputs: scale = (max - min) / 15, grid offset at the minimum."""
    w = w.detach().float().cpu()
    out, k = w.shape
    g = w.view(out, k // INT4_GROUP, INT4_GROUP)  # [out, groups, group]
    lo, hi = g.amin(-1), g.amax(-1)  # [out, groups]
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()  # the value of code 8
    codes = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    codes_u8 = codes.to(torch.uint8).view(out, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_u8.to(torch.int32), 1)
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(packed, scale_zero, codes_u8)


def tiles_supported(w: torch.Tensor) -> bool:
    """The AMX kernel (`q8act_amx_mm`) takes outputs in tiles of 16 rows and inputs in groups of 32."""
    out, k = w.shape
    return k % INT4_GROUP == 0 and out % 16 == 0


def rows8_supported(w: torch.Tensor) -> bool:
    """The fused int8-activation kernels (fused/decode_cpu.cpp) take outputs in blocks of 8 rows and
    inputs in whole groups of 32."""
    out, k = w.shape
    return k % INT4_GROUP == 0 and out % 8 == 0


def _interleave_rows(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """[out, in] codes -> [out/rows, in/32, 8 steps, rows, 4]: per group of 32 inputs, step t holds each of
    `rows` rows' codes 4t..4t+3 side by side (the AVX2 kernels' lane l, or an AMX tile's column l = row l)."""
    out, k = codes.shape
    return codes.view(out // rows, rows, k // INT4_GROUP, 8, 4).permute(0, 2, 3, 1, 4)


def _pack_int4(q4: Int4Weight, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes interleaved `rows` at a time (`_interleave_rows`), steps t and t + 4 sharing a byte (low and
    high nibble): [out/rows, in/32, 4, 4 * rows] uint8; scale and zero per group, the block's rows side by
    side: [out/rows, in/32, rows] fp32, with w = (code - 8) * scale + zero, the weights of `q4.dequantized()`."""
    out, k = q4.codes.shape
    c = _interleave_rows(q4.codes, rows)  # [out/rows, groups, 8 steps, rows, 4]
    packed = (
        (c[:, :, :4] | (c[:, :, 4:] << 4)).reshape(out // rows, k // INT4_GROUP, 4, 4 * rows).contiguous()
    )
    sz = q4.scale_zero.float().transpose(0, 1)  # [out, groups, 2]

    def by_block(a: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [out/rows, groups, rows]
        return a.reshape(out // rows, rows, -1).permute(0, 2, 1).contiguous()

    return packed, by_block(sz[..., 0]), by_block(sz[..., 1])


def _pack_int8(q8: Int8Weight, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes interleaved `rows` at a time: [out/rows, in/32, 8, 4 * rows]; the per-row scales [out] fp32."""
    out, k = q8.q.shape
    packed = _interleave_rows(q8.q, rows).reshape(out // rows, k // INT4_GROUP, 8, 4 * rows).contiguous()
    return packed, q8.scales.float().contiguous()


def pack_rows8_int4(q4: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 weights for `int4_q8act_mm`: codes [out/8, in/32, 4, 32] uint8 (k = 4t+b in the low nibble of
    byte 4l+b of vector t, k = 4(t+4)+b in its high nibble), scale and zero [out/8, in/32, 8] fp32."""
    return _pack_int4(q4, 8)


def pack_rows8_int8(q8: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes for `int8_q8act_mm`: [out/8, in/32, 8, 32] (lane l of vector t: row l's codes 4t..4t+3)
    and the per-row scales [out] fp32."""
    return _pack_int8(q8, 8)


def pack_tiles_int4(q4: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 weights for `q8act_amx_mm`: codes in the AMX tile layout [out/16, in/32, 8 rows, 64] two a byte,
    rows r and r + 4 in the low and high nibbles ([out/16, in/32, 4, 64] uint8); scale and zero
    [out/16, in/32, 16] fp32."""
    return _pack_int4(q4, 16)


def pack_tiles_int8(q8: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights for `q8act_amx_mm`: codes [out/16, in/32, 8, 64] and the per-row scales [out] fp32."""
    return _pack_int8(q8, 16)
