"""Falcon with rotary positions: Falcon-7B (multi-query, one KV head, parallel attention+MLP off a single
LayerNorm), Falcon-40B style (`new_decoder_architecture`: grouped KV heads, ln_attn/ln_mlp), and the
sequential variant (`parallel_attn=False`: post-attention LayerNorm). GELU MLP, optional biases, tied head.

transformers lays the fused query_key_value out per KV group as [kvh, q_per_kv + 2, hd] (the old
multi-query layout [H + 2, hd] is one group; the old multi-head layout [H, 3, hd] is H groups of one);
rows are reordered at load into [q | k | v]. ALiBi Falcon (Falcon-RW) is out of scope and refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import StepContext
from ..kv_pool import KVShape
from ..linear import Linear, linear
from .base import DecoderModel, activation, layer_norm, param, rope_spec, ungroup_qkv

Norm = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _FalconLayer:
    ln_attn: Norm
    ln_mlp: Norm | None
    """Second LayerNorm: ln_mlp (40B, parallel) or post_attention_layernorm (sequential); None when the
    MLP reads the attention's LayerNorm output (7B)."""
    w_qkv: torch.Tensor | Linear  # [(H + 2*kvh)*hd, D], rows as [q | k | v]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor | Linear  # [D, H*hd]
    b_o: torch.Tensor | None
    w_up: torch.Tensor | Linear  # [F, D]
    b_up: torch.Tensor | None
    w_down: torch.Tensor | Linear  # [D, F]
    b_down: torch.Tensor | None


class FalconModel(DecoderModel):
    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        cfg = hf_model.config
        if cfg.alibi:
            raise ValueError(
                "Falcon with alibi=True (Falcon-RW) is not supported; only rotary Falcon models are"
            )
        core = hf_model.transformer
        self.H = cfg.num_attention_heads
        self.hd = cfg.hidden_size // self.H
        if cfg.new_decoder_architecture:
            self.kvh = cfg.num_kv_heads
        else:
            self.kvh = 1 if cfg.multi_query else self.H
        self.parallel = bool(cfg.new_decoder_architecture or cfg.parallel_attn)
        self.eps = float(cfg.layer_norm_epsilon)
        self.act = activation(cfg.activation)
        self.vocab_size = cfg.vocab_size
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self.kv_shape = KVShape(layers=cfg.num_hidden_layers, kv_heads=self.kvh, head_dim=self.hd)
        self.spec = rope_spec(core.rotary_emb, self.hd)
        p = lambda t: param(t, dtype, device)  # noqa: E731
        opt = lambda t: None if t is None else p(t)  # noqa: E731
        norm = lambda m: (p(m.weight), p(m.bias))  # noqa: E731
        qkv = lambda t: p(ungroup_qkv(t, self.kvh, self.H // self.kvh, self.hd))  # noqa: E731
        self.word_embeddings = p(core.word_embeddings.weight)
        tied = hf_model.lm_head.weight.data_ptr() == core.word_embeddings.weight.data_ptr()
        self.lm_head = self.word_embeddings if tied else p(hf_model.lm_head.weight)
        self.ln_f = norm(core.ln_f)
        self.layers: list[_FalconLayer] = []
        for layer in core.h:
            a, m = layer.self_attention, layer.mlp
            ln_mlp: Norm | None
            if hasattr(layer, "ln_attn"):  # two LayerNorms in parallel (40B)
                ln_attn, ln_mlp = norm(layer.ln_attn), norm(layer.ln_mlp)
            else:
                ln_attn = norm(layer.input_layernorm)
                ln_mlp = None if self.parallel else norm(layer.post_attention_layernorm)
            qkv_bias = a.query_key_value.bias
            self.layers.append(
                _FalconLayer(
                    ln_attn=ln_attn,
                    ln_mlp=ln_mlp,
                    w_qkv=qkv(a.query_key_value.weight),
                    b_qkv=None if qkv_bias is None else qkv(qkv_bias),
                    w_o=p(a.dense.weight),
                    b_o=opt(a.dense.bias),
                    w_up=p(m.dense_h_to_4h.weight),
                    b_up=opt(m.dense_h_to_4h.bias),
                    w_down=p(m.dense_4h_to_h.weight),
                    b_down=opt(m.dense_4h_to_h.bias),
                )
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings[input_ids]  # [N, D]

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w, N, H, kvh, hd = self.layers[i], x.shape[0], self.H, self.kvh, self.hd
        h = layer_norm(x, *w.ln_attn, self.eps)  # [N, D]
        qkv = linear(h, w.w_qkv, w.b_qkv)  # [N, (H + 2*kvh)*hd]
        q, k, v = qkv.split([H * hd, kvh * hd, kvh * hd], dim=-1)
        out = ctx.attend(i, q.view(N, H, hd), k.view(N, kvh, hd), v.view(N, kvh, hd))  # [N, H, hd]
        attn = linear(out.reshape(N, H * hd), w.w_o, w.b_o)  # [N, D]
        if self.parallel:  # x + (mlp(ln_mlp(x) or h) + attn(h))
            h_mlp = h if w.ln_mlp is None else layer_norm(x, *w.ln_mlp, self.eps)
            return x + (self._mlp(w, h_mlp) + attn)
        assert w.ln_mlp is not None  # sequential layers always have post_attention_layernorm
        x = x + attn
        return x + self._mlp(w, layer_norm(x, *w.ln_mlp, self.eps))

    def _mlp(self, w: _FalconLayer, h: torch.Tensor) -> torch.Tensor:
        return linear(self.act(linear(h, w.w_up, w.b_up)), w.w_down, w.b_down)  # [N, D]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, *self.ln_f, self.eps)
