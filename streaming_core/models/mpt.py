"""MPT: ALiBi positions (no rotary), fused Wqkv laid out [q of all heads | k | v], LayerNorms without
bias, GELU MLP, optional clip_qkv, tied head.

ALiBi penalises a key by its distance to the query; in the sink+window cache that is the distance in
the cache (the attention backend applies it from `PositionalSpec.alibi_slopes`). The slopes follow the
original MPT's attn_config.alibi_bias_max (transformers' port always uses 8, the value every released
MPT has). Grouped/multi-query KV heads (kv_n_heads) are read off the Wqkv shape. Variants whose weights
transformers' port does not carry are refused: qk_ln (no q/k LayerNorm weights) and alibi=False
(learned position embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import PositionalSpec, StepContext
from ..kv_pool import KVShape
from ..linear import Linear, linear
from ..positions import alibi_slopes
from .base import DecoderModel, layer_norm, param


@dataclass
class _MptLayer:
    norm_1: tuple[torch.Tensor, torch.Tensor | None]
    norm_2: tuple[torch.Tensor, torch.Tensor | None]
    w_qkv: torch.Tensor | Linear  # [(H + 2*kvh)*hd, D]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor | Linear  # [D, H*hd]
    b_o: torch.Tensor | None
    w_up: torch.Tensor | Linear  # [F, D]
    b_up: torch.Tensor | None
    w_down: torch.Tensor | Linear  # [D, F]
    b_down: torch.Tensor | None


class MptModel(DecoderModel):
    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        cfg = hf_model.config
        attn_cfg = cfg.attn_config
        if getattr(attn_cfg, "qk_ln", False):
            raise ValueError(
                "MPT with attn_config.qk_ln=True is not supported (transformers' MPT has no q/k norms)"
            )
        if not getattr(attn_cfg, "alibi", True):
            raise ValueError("MPT without ALiBi (learned position embeddings) is not supported")
        core = hf_model.transformer
        self.H = cfg.n_heads
        self.hd = cfg.d_model // self.H
        qkv_rows = core.blocks[0].attn.Wqkv.weight.shape[0]
        self.kvh = (qkv_rows // self.hd - self.H) // 2
        if (self.H + 2 * self.kvh) * self.hd != qkv_rows or self.kvh < 1 or self.H % self.kvh:
            raise ValueError(
                f"MPT Wqkv has {qkv_rows} rows: not (H + 2 * kv_heads) * head_dim with H={self.H}"
            )
        self.eps = float(cfg.layer_norm_epsilon)
        self.clip = float(attn_cfg.clip_qkv) if attn_cfg.clip_qkv else None
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.max_seq_len
        self.kv_shape = KVShape(layers=cfg.n_layers, kv_heads=self.kvh, head_dim=self.hd)
        scale = attn_cfg.softmax_scale
        self.spec = PositionalSpec(
            kind="alibi",
            scale=float(scale) if scale is not None else self.hd**-0.5,
            alibi_slopes=alibi_slopes(self.H, float(attn_cfg.alibi_bias_max)),
        )
        p = lambda t: param(t, dtype, device)  # noqa: E731
        opt = lambda t: None if t is None else p(t)  # noqa: E731
        norm = lambda m: (p(m.weight), opt(m.bias))  # noqa: E731
        self.wte = p(core.wte.weight)
        tied = hf_model.lm_head.weight.data_ptr() == core.wte.weight.data_ptr()
        self.lm_head = self.wte if tied else p(hf_model.lm_head.weight)
        self.norm_f = norm(core.norm_f)
        self.layers: list[_MptLayer] = []
        for block in core.blocks:
            a, m = block.attn, block.ffn
            self.layers.append(
                _MptLayer(
                    norm_1=norm(block.norm_1),
                    norm_2=norm(block.norm_2),
                    w_qkv=p(a.Wqkv.weight),
                    b_qkv=opt(a.Wqkv.bias),
                    w_o=p(a.out_proj.weight),
                    b_o=opt(a.out_proj.bias),
                    w_up=p(m.up_proj.weight),
                    b_up=opt(m.up_proj.bias),
                    w_down=p(m.down_proj.weight),
                    b_down=opt(m.down_proj.bias),
                )
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte[input_ids]  # [N, D]

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w, N, H, kvh, hd = self.layers[i], x.shape[0], self.H, self.kvh, self.hd
        qkv = linear(layer_norm(x, *w.norm_1, self.eps), w.w_qkv, w.b_qkv)  # [N, (H + 2*kvh)*hd]
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = qkv.split([H * hd, kvh * hd, kvh * hd], dim=-1)
        out = ctx.attend(i, q.view(N, H, hd), k.view(N, kvh, hd), v.view(N, kvh, hd))  # [N, H, hd]
        x = x + linear(out.reshape(N, H * hd), w.w_o, w.b_o)  # [N, D]
        h = F.gelu(linear(layer_norm(x, *w.norm_2, self.eps), w.w_up, w.b_up))  # [N, F]
        return x + linear(h, w.w_down, w.b_down)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, *self.norm_f, self.eps)
