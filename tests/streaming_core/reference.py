"""A plain StreamingLLM reference, written independently of the engine's cache and position code.

Keys are kept *before* rotation in Python lists; every step each cached key is re-rotated with its
position in the cache (0..L-1) and the query with L-1; eviction deletes the oldest non-sink entry.
It plugs into a model's layers as their attention backend, so it checks the pool, the ring, the
positions and the masks, while the layers themselves are checked against transformers.
"""

from __future__ import annotations

import torch

from streaming_core.attention import PositionalSpec


def _rotate(x: torch.Tensor, positions: torch.Tensor, spec: PositionalSpec) -> torch.Tensor:
    """x [L, heads, D]; rotate the first rotary_dim features by each row's position (fp64 angles)."""
    assert spec.inv_freq is not None
    rd = spec.rotary_dim
    ang = positions.double()[:, None] * spec.inv_freq.double()[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype) * spec.rope_scaling
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype) * spec.rope_scaling
    r = x[..., :rd]
    half = rd // 2
    rot = torch.cat([-r[..., half:], r[..., :half]], -1)
    return torch.cat([r * cos[:, None] + rot * sin[:, None], x[..., rd:]], -1)


class NaiveStreamingAttention:
    """Batch-1, one token per forward; `attend` has the signature layers expect from a step context."""

    fused = None
    """A step context's compiled kernels: the reference has none, so models take their eager path."""

    def __init__(self, spec: PositionalSpec, layers: int, sink_tokens: int, window: int) -> None:
        self.spec, self.S, self.W = spec, sink_tokens, window
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert q.shape[0] == 1, "the reference takes one token at a time"
        keys, values = self.keys[layer], self.values[layer]
        keys.append(k[0])
        values.append(v[0])
        if len(keys) > self.S + self.W:  # evict the oldest window token, keep the sinks
            del keys[self.S]
            del values[self.S]
        K = torch.stack(keys)  # [L, kvh, D]
        V = torch.stack(values)
        L = K.shape[0]
        pos = torch.arange(L)
        if self.spec.kind == "rope":
            K = _rotate(K, pos, self.spec)
            q = _rotate(q, pos[-1:], self.spec)
        H, kvh = q.shape[1], K.shape[1]
        K = K.repeat_interleave(H // kvh, dim=1)  # [L, H, D]
        V = V.repeat_interleave(H // kvh, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[0].float(), K.float()) * self.spec.scale  # [H, L]
        if self.spec.kind == "alibi":
            assert self.spec.alibi_slopes is not None
            scores = scores - self.spec.alibi_slopes[:, None] * (L - 1 - pos)[None, :].float()
        probs = scores.softmax(-1)
        return torch.einsum("hl,lhd->hd", probs, V.float()).to(q.dtype)[None]


@torch.inference_mode()
def reference_logits(model, tokens: list[int], sink_tokens: int, window: int) -> torch.Tensor:
    """Logits [len(tokens), V] of the plain reference, token by token."""
    ctx = NaiveStreamingAttention(model.spec, model.kv_shape.layers, sink_tokens, window)
    out = []
    for t in tokens:
        hidden = model(torch.tensor([t]), ctx)
        out.append(model.logits(hidden))
    return torch.cat(out)
