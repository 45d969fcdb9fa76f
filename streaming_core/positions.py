"""Position logic of the sink+window cache, as pure functions.

A slot holds `S` sink entries (stream tokens 0..S-1, kept forever) followed by a ring of `W` window
entries; stream token t >= S lives at ring entry S + (t - S) % W, overwriting token t - W.

StreamingLLM gives positions *in the cache*: sinks at 0..S-1, the window at S.. in order, the current
token last. Two facts let us store keys rotated once, at write time, by their stream index t:
- between a query at stream index t and a window key at t', the cache distance is t - t' (the window
  is a contiguous run of the stream), so RoPE on stream indices gives the same dot product;
- a sink key i sits at cache distance p - i, where p is the query's cache position (the number of
  entries it attends to, itself included, minus one), so sink scores use the query rotated by p.
  p is counted from the slot, never derived from t, so a slot rebuilt or offset in the stream stays exact.
Angles come from fp64 so that stream indices in the millions stay exact.
"""

from __future__ import annotations

import math

import torch


def ring_index(t: torch.Tensor, sink_tokens: int | torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
    """Slot entry that stream token t is written to (sinks and window may be per-row tensors)."""
    return torch.where(t < sink_tokens, t, sink_tokens + (t - sink_tokens).remainder(window))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, rotary_dim] for integer positions, angles computed in fp64."""
    inv = inv_freq.to(device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]  # [N, rd/2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, rd]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [N, heads, D] (GPT-NeoX half-split layout)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in three ops: rotate_half(x) * sin is x rolled by half the rotary span times sin with
    its first half negated, which the caller's table already is. cos/sin_signed broadcast to [N, 1, rd]."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rd // 2, dims=-1), sin_signed)
    rot = x[..., :rd]
    out = torch.addcmul(rot * cos, rot.roll(rd // 2, dims=-1), sin_signed)
    return torch.cat((out, x[..., rd:]), dim=-1)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """ALiBi head slopes as MPT defines them (non-powers of two interleave the next power's slopes)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    m = torch.arange(1, n + 1, dtype=torch.float64) * (max_bias / n)
    slopes = 1.0 / torch.pow(2.0, m)
    if n != num_heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:num_heads]
    return slopes.to(torch.float32)
