"""Attention over the sink+window pool for one batched step.

The runner builds a `StepContext` once per step (positions, masks, write targets, all as tensors);
every layer then calls `ctx.attend(layer, q, k, v)` with *unrotated* q/k. Rows are laid out as the
decode group first (one token per session), then each prefill chunk.

Decode: the new key is written first (overwriting the evicted ring entry), then the query attends
over the slot. Prefill: a chunk attends over the slot as it was plus its own causal part, and is
written afterwards, since later queries of the chunk may still need entries its tokens overwrite.

Both read only the filled prefix of a slot (`KVPool.extent`, rounded up to a power of two so that a
step's shapes come from a handful of buckets): a session holding 100 tokens scores 128 entries, not
the slot's whole capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from .batch import SeqChunk
from .kv_pool import KVPool
from .positions import ring_index, rope_cos_sin, rotate

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PositionalSpec:
    """How a model family encodes positions; the attention backend applies it, layers never do."""

    kind: str
    """'rope' or 'alibi'."""
    scale: float
    """Softmax scale applied to q.k."""
    rotary_dim: int = 0
    """Leading features of each head that RoPE rotates (partial rotary for GPT-NeoX)."""
    inv_freq: torch.Tensor | None = None
    """RoPE inverse frequencies [rotary_dim / 2]."""
    rope_scaling: float = 1.0
    """Multiplier on cos/sin some RoPE variants use (transformers' attention_scaling)."""
    alibi_slopes: torch.Tensor | None = None
    """ALiBi slope per query head [heads]."""


@dataclass
class _Rope:
    cos_w: torch.Tensor  # [N, 1, rd] stream positions: queries vs window keys, and the new keys
    sin_w: torch.Tensor  # [N, 1, rd] signed (see positions.rotate)
    cos_s: torch.Tensor  # [N, 1, rd] cache positions: queries vs sink keys
    sin_s: torch.Tensor


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, without a dispatcher round trip when it already is (decode runs this 4x per layer)."""
    return x if x.dtype == dtype else x.to(dtype)


def fused_decode_possible(pool: KVPool, spec: PositionalSpec) -> bool:
    """The fused CPU kernels take this pool and model: RoPE over the whole head, activations in fp32, KV in
    fp32 or bf16, on the CPU."""
    return (
        spec.kind == "rope"
        and pool.device.type == "cpu"
        and pool.dtype == torch.float32
        and pool.kv_dtype in (torch.float32, torch.bfloat16)
        and spec.rotary_dim == pool.shape.head_dim
    )


def fill_bucket(extent: int, capacity: int) -> int:
    """Entries a step reads for a slot filled up to `extent`: the next power of two (at least 16), capped."""
    return min(capacity, max(16, 1 << max(extent - 1, 0).bit_length()))


def _tables(
    positions: torch.Tensor, spec: PositionalSpec, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [N, 1, rd] and signed sin [N, 1, rd] for `rotate`."""
    assert spec.inv_freq is not None
    cos, sin = rope_cos_sin(positions, spec.inv_freq, spec.rope_scaling, dtype)
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None]


@dataclass
class _Decode:
    rows: int
    sink_max: int  # largest sink count in the group
    sink_cols: (
        torch.Tensor | None
    )  # [B, 1, 1, sink_max] which leading entries are sinks, None if all rows agree
    slots: torch.Tensor  # [B]
    sinks: torch.Tensor  # [B] sink entries of each row's slot
    entries: torch.Tensor  # [B] ring entry each new token is written to
    targets: torch.Tensor  # [B*kvh] where each (token, kv head) goes in a layer's pool viewed as [-1, hd]
    view: slice | None  # slots as a contiguous range: attend over a view, no gather
    length: int  # entries read per slot: the filled prefix's bucket
    bias: torch.Tensor  # [B, kvh|1, g|1, length] additive mask (+ ALiBi)
    flat_bias: torch.Tensor | None  # [B, length] the RoPE mask as the fused kernel reads it


@dataclass
class _Prefill:
    row0: int
    slot: int
    sinks: int
    empty: bool  # the slot holds nothing yet: skip scoring its (all masked) entries
    length: int  # cache entries read: the filled prefix's bucket
    cache_bias: torch.Tensor  # [kvh|1, g|1, C, length]
    chunk_bias: torch.Tensor  # [kvh|1, g|1, C, C]
    chunk_is_sink: torch.Tensor  # [C] keys of the chunk that are sinks (scored with the sink query)
    write_rows: torch.Tensor  # [M] chunk rows that end up in the slot
    write_entries: torch.Tensor  # [M]


class StepContext:
    """Per-step attention metadata; built from the plan, read by every layer."""

    def __init__(
        self,
        pool: KVPool,
        spec: PositionalSpec,
        decode: list[SeqChunk],
        prefill: list[SeqChunk],
        fused: ModuleType | None = None,
    ):
        self.pool, self.spec = pool, spec
        cache = pool.cache
        self.S, self.cap = cache.sink_tokens, cache.capacity
        dev = pool.device
        self.kvh = pool.shape.kv_heads
        starts = [c.start for c in decode]
        for c in prefill:
            starts.extend(range(c.start, c.start + len(c.tokens)))
        t = torch.tensor(starts, dtype=torch.long).to(dev)  # [N] stream index of every row
        # p: each query's position in the cache (tokens it attends to, itself included, minus one).
        p_parts: list[torch.Tensor] = []
        self.decode = self._build_decode(decode, t[: len(decode)], p_parts) if decode else None
        self.prefill: list[_Prefill] = []
        row = len(decode)
        for c in prefill:
            self.prefill.append(self._build_prefill(c, row, t[row : row + len(c.tokens)], p_parts))
            row += len(c.tokens)
        self.sink_query = (self.decode is not None and self.decode.sink_max > 0) or any(
            m.sinks > 0 for m in self.prefill
        )
        """Some row scores sink keys, which needs the query rotated by its cache position."""
        self.rope: _Rope | None = None
        if spec.kind == "rope":
            p = torch.cat(p_parts) if len(p_parts) > 1 else p_parts[0] if p_parts else t
            cw, sw = _tables(t, spec, pool.dtype)
            cs, ss = _tables(p, spec, pool.dtype)
            self.rope = _Rope(cw, sw, cs, ss)
        self.fused = fused if fused is not None and self._fusable() else None
        """The compiled CPU kernels (streaming_core/fused) when this step can run on them: `attend_qkv`."""

    def _fusable(self) -> bool:
        """Decode-only steps on a pool and model the kernels take (`fused_decode_possible`)."""
        return self.decode is not None and not self.prefill and fused_decode_possible(self.pool, self.spec)

    # -- metadata -------------------------------------------------------------------------------
    def _heads_bias(self, dist: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """Additive bias [..., kvh|1, g|1, Q, K] from validity [..., Q, K] and, for ALiBi, distances."""
        mask = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        mask = mask.masked_fill(~valid, NEG_INF)[..., None, None, :, :]
        if self.spec.kind != "alibi":
            return mask
        assert self.spec.alibi_slopes is not None and dist is not None
        slopes = self.spec.alibi_slopes.to(valid.device).view(self.kvh, -1)  # [kvh, g]
        return mask - slopes[:, :, None, None] * dist[..., None, None, :, :].to(torch.float32)

    def _build_decode(self, chunks: list[SeqChunk], t: torch.Tensor, p_parts: list[torch.Tensor]) -> _Decode:
        pool, dev = self.pool, self.pool.device
        slot_ids = [c.slot for c in chunks]
        sinks = [self.S if c.sinks is None else c.sinks for c in chunks]
        for c in chunks:
            pool.note_written(c.slot, c.start)
        length = fill_bucket(max(pool.extent[i] for i in slot_ids), self.cap)
        slots, S = torch.tensor([slot_ids, sinks], dtype=torch.long).to(dev)  # [B] each
        entries = ring_index(t, S, self.cap - S)
        pool.write_positions(slots, entries, t)
        heads = torch.arange(self.kvh, device=dev)
        targets = ((slots[:, None] * self.kvh + heads) * self.cap + entries[:, None]).view(-1)  # [B*kvh]
        first = slot_ids[0]
        contiguous = slot_ids == list(range(first, first + len(slot_ids)))
        pos = pool.pos[slots, :length]  # [B, length] after the write
        # a row sees entries up to its own stream index: rows of one prompt chunk (runner.py) are written
        # together, and each must not see the chunk's later tokens; a lone decode row holds the newest
        valid = (pos >= 0) & (pos <= t[:, None])
        p = valid.sum(-1) - 1  # [B]
        p_parts.append(p)
        dist = None  # only ALiBi reads distances; RoPE's bias is the mask alone
        if self.spec.kind == "alibi":
            idx = torch.arange(length, device=dev)
            dist = torch.where(idx < S[:, None], p[:, None] - idx, t[:, None] - pos)[:, None, :]
        bias = self._heads_bias(dist, valid[:, None, :])[:, :, :, 0]  # [B, kvh|1, g|1, length]
        view = slice(first, first + len(chunks)) if contiguous else None
        smax = min(max(sinks), length)
        cols = None
        if min(sinks) != max(sinks):
            cols = (torch.arange(smax, device=dev) < S[:, None])[:, None, None, :]  # [B, 1, 1, smax]
        flat = bias.reshape(len(chunks), length) if dist is None else None  # [B, length]
        return _Decode(len(chunks), smax, cols, slots, S, entries, targets, view, length, bias, flat)

    def _build_prefill(
        self, c: SeqChunk, row0: int, t: torch.Tensor, p_parts: list[torch.Tensor]
    ) -> _Prefill:
        S = self.S if c.sinks is None else c.sinks
        W, dev = self.cap - S, self.pool.device
        extent = self.pool.extent[c.slot]  # before this chunk's write
        self.pool.note_written(c.slot, c.start + len(c.tokens) - 1)
        length = fill_bucket(extent, self.cap)
        pos = self.pool.pos[c.slot, :length]  # [length] before the write
        idx = torch.arange(length, device=dev)
        tq = t[:, None]
        valid_c = (pos >= 0) & ((idx < S) | (tq - pos < W))  # [C, length]
        tk = t[None, :]  # chunk keys
        is_sink = t < S
        valid_n = (tk <= tq) & (is_sink[None, :] | (tq - tk < W))  # [C, C]
        p = (valid_c.sum(-1) + valid_n.sum(-1) - 1)[:, None]  # [C, 1]
        p_parts.append(p[:, 0])
        dist_c = torch.where(idx < S, p - idx, tq - pos)
        dist_n = torch.where(is_sink[None, :], p - tk, tq - tk)
        keep = is_sink | (t >= t[-1] + 1 - W)
        rows = torch.nonzero(keep).flatten()
        return _Prefill(
            row0=row0,
            slot=c.slot,
            sinks=S,
            empty=extent == 0,
            length=length,
            cache_bias=self._heads_bias(dist_c, valid_c),
            chunk_bias=self._heads_bias(dist_n, valid_n),
            chunk_is_sink=is_sink,
            write_rows=rows,
            write_entries=ring_index(t[rows], S, W),
        )

    def finish(self, prefill: list[SeqChunk]) -> None:
        """Record the prefill chunks' entries in the pool once every layer has written its keys."""
        for meta, c in zip(self.prefill, prefill, strict=True):
            t = torch.arange(c.start, c.start + len(c.tokens), device=self.pool.device)[meta.write_rows]
            slots = torch.full_like(t, c.slot)
            self.pool.write_positions(slots, meta.write_entries, t)

    # -- the attention itself -------------------------------------------------------------------
    def attend_qkv(self, layer: int, qkv: torch.Tensor, out_bf16: bool) -> torch.Tensor:
        """`attend` on the fused kernels, from the packed projection: qkv [B, (H + 2*kvh)*hd] (fp32 or bf16)
        -> [B, H*hd], in bf16 when it feeds a quantized kernel. Only when `self.fused` is set."""
        f, d, r, pool = self.fused, self.decode, self.rope, self.pool
        assert f is not None and d is not None and r is not None
        hd = pool.shape.head_dim
        heads = qkv.shape[1] // hd - 2 * self.kvh
        q_w, q_s = f.rope_write(
            qkv, r.cos_w, r.sin_w, r.cos_s, r.sin_s, self.spec.scale, heads, self.kvh,
            pool.layer_k_rows[layer], pool.layer_v_rows[layer], d.targets, self.sink_query,
        )  # fmt: skip
        return f.attend(
            q_w,
            q_s,
            pool.layer_k[layer],
            pool.layer_v[layer],
            d.slots,
            d.sinks,
            d.flat_bias,
            d.length,
            out_bf16,
        )  # [B, H*hd]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, hd], k/v [N, kvh, hd] (unrotated) -> [N, H, hd]."""
        q = q * self.spec.scale  # RoPE is linear: scaling before rotating serves both rotations
        q_w = q_s = q
        if self.rope is not None:
            r = self.rope
            q_w, k = rotate(q, r.cos_w, r.sin_w), rotate(k, r.cos_w, r.sin_w)
            if self.sink_query:
                q_s = rotate(q, r.cos_s, r.sin_s)
        if not self.prefill and self.decode is not None:
            return self._attend_decode(layer, q_w, q_s, k, v)
        out = torch.empty_like(q)
        if self.decode is not None:
            n = self.decode.rows
            out[:n] = self._attend_decode(layer, q_w[:n], q_s[:n], k[:n], v[:n])
        for meta in self.prefill:
            rows = slice(meta.row0, meta.row0 + meta.chunk_is_sink.shape[0])
            out[rows] = self._attend_prefill(layer, meta, q_w[rows], q_s[rows], k[rows], v[rows])
        return out

    def _attend_decode(
        self, layer: int, q_w: torch.Tensor, q_s: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        d, pool = self.decode, self.pool
        assert d is not None
        S, L = d.sink_max, d.length
        # [B, kvh, hd] into [slots, kvh, cap, hd]: index_copy_ over the flattened rows, not an advanced-index
        # assignment, whose index_put_ took milliseconds from 16 rows up when another process wanted a core
        hd = k.shape[-1]
        pool.layer_k_rows[layer].index_copy_(0, d.targets, _as(k, pool.kv_dtype).reshape(-1, hd))
        pool.layer_v_rows[layer].index_copy_(0, d.targets, _as(v, pool.kv_dtype).reshape(-1, hd))
        pk, pv = pool.layer_k[layer], pool.layer_v[layer]  # [slots, kvh, cap, hd]
        if d.view is not None:
            K, V = pk[d.view, :, :L], pv[d.view, :, :L]  # [B, kvh, L, hd] views
        else:
            K, V = pk[d.slots, :, :L], pv[d.slots, :, :L]  # [B, kvh, L, hd] gathers
        K, V = _as(K, q_w.dtype), _as(V, q_w.dtype)  # casts only when the KV is stored narrower
        B, H = q_w.shape[:2]
        qw = q_w.view(B, self.kvh, H // self.kvh, hd)  # [B, kvh, g, hd]
        scores = torch.matmul(qw, K.transpose(-1, -2))  # [B, kvh, g, L]
        if S > 0 and self.rope is not None:
            qs = q_s.view(B, self.kvh, H // self.kvh, hd)
            sink = torch.matmul(qs, K[:, :, :S].transpose(-1, -2))  # [B, kvh, g, S]
            scores[..., :S] = sink if d.sink_cols is None else torch.where(d.sink_cols, sink, scores[..., :S])
        if scores.dtype != torch.float32:
            scores = scores.float()
        probs = torch.softmax(scores + d.bias, dim=-1)
        if probs.dtype != V.dtype:
            probs = probs.to(V.dtype)
        return torch.matmul(probs, V).view(B, H, hd)  # [B, H, hd]

    def _attend_prefill(
        self, layer: int, m: _Prefill, q_w: torch.Tensor, q_s: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        S, pool, kvh = m.sinks, self.pool, self.kvh
        C, H, hd = q_w.shape
        g = H // kvh
        Kc, Vc = pool.k[layer, m.slot, :, : m.length], pool.v[layer, m.slot, :, : m.length]  # [kvh, L, hd]
        Kc, Vc = _as(Kc, q_w.dtype), _as(Vc, q_w.dtype)
        qw = q_w.view(C, kvh, g, hd).permute(1, 2, 0, 3)  # [kvh, g, C, hd]
        qs = q_s.view(C, kvh, g, hd).permute(1, 2, 0, 3)
        kn, vn = k.transpose(0, 1), v.transpose(0, 1)  # [kvh, C, hd]
        sc_chunk = torch.matmul(qw, kn[:, None].transpose(-1, -2))  # [kvh, g, C, C]
        if S > 0 and self.rope is not None:
            sink_sc = torch.matmul(qs, kn[:, None].transpose(-1, -2))
            sc_chunk = torch.where(m.chunk_is_sink, sink_sc, sc_chunk)
        if m.empty:
            probs = torch.softmax(sc_chunk.float() + m.chunk_bias, dim=-1).to(vn.dtype)  # [kvh, g, C, C]
            out = torch.matmul(probs, vn[:, None])
        else:
            sc_cache = torch.matmul(qw, Kc[:, None].transpose(-1, -2))  # [kvh, g, C, L]
            if S > 0 and self.rope is not None:
                sc_cache[..., :S] = torch.matmul(qs, Kc[:, None, :S].transpose(-1, -2))
            scores = torch.cat((sc_cache.float() + m.cache_bias, sc_chunk.float() + m.chunk_bias), dim=-1)
            probs = torch.softmax(scores, dim=-1).to(Vc.dtype)  # [kvh, g, C, L + C]
            cap = Kc.shape[1]
            out = torch.matmul(probs[..., :cap], Vc[:, None]) + torch.matmul(probs[..., cap:], vn[:, None])
        pool.k[layer, m.slot, :, m.write_entries] = _as(kn[:, m.write_rows], pool.kv_dtype)
        pool.v[layer, m.slot, :, m.write_entries] = _as(vn[:, m.write_rows], pool.kv_dtype)
        return out.permute(2, 0, 1, 3).reshape(C, H, hd)  # [C, H, hd]
