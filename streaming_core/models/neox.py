"""GPT-NeoX / Pythia: LayerNorm with bias, partial rotary, fused per-head qkv, GELU MLP, biases,
parallel (Pythia) or sequential residual, untied output embedding.

transformers lays the fused query_key_value output out per head as [H, 3, hd]; the rows are reordered
at load into [q | k | v] so that a single split feeds the attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import StepContext
from ..kv_pool import KVShape
from ..linear import Linear, linear
from .base import DecoderModel, activation, layer_norm, param, rope_spec, ungroup_qkv


@dataclass
class _NeoXLayer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    w_qkv: torch.Tensor | Linear  # [3*H*hd, D], rows as [q | k | v]
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor | Linear  # [D, H*hd]
    b_o: torch.Tensor | None
    w_up: torch.Tensor | Linear  # [F, D]
    b_up: torch.Tensor | None
    w_down: torch.Tensor | Linear  # [D, F]
    b_down: torch.Tensor | None


class NeoXModel(DecoderModel):
    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        cfg = hf_model.config
        core = hf_model.gpt_neox
        self.H = cfg.num_attention_heads
        self.hd = cfg.hidden_size // self.H
        self.eps = float(cfg.layer_norm_eps)
        self.parallel = bool(cfg.use_parallel_residual)
        self.act = activation(cfg.hidden_act)
        self.vocab_size = cfg.vocab_size
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self.kv_shape = KVShape(layers=cfg.num_hidden_layers, kv_heads=self.H, head_dim=self.hd)
        self.spec = rope_spec(core.rotary_emb, self.hd)
        p = lambda t: param(t, dtype, device)  # noqa: E731
        opt = lambda t: None if t is None else p(t)  # noqa: E731
        qkv = lambda t: ungroup_qkv(t, self.H, 1, self.hd)  # noqa: E731  [H, 3, hd] rows -> [q | k | v]
        self.embed_in = p(core.embed_in.weight)
        self.lm_head = p(hf_model.get_output_embeddings().weight)
        self.ln_f = (p(core.final_layer_norm.weight), p(core.final_layer_norm.bias))
        self.layers: list[_NeoXLayer] = []
        for layer in core.layers:
            a, m = layer.attention, layer.mlp
            self.layers.append(
                _NeoXLayer(
                    ln1=(p(layer.input_layernorm.weight), p(layer.input_layernorm.bias)),
                    ln2=(p(layer.post_attention_layernorm.weight), p(layer.post_attention_layernorm.bias)),
                    w_qkv=p(qkv(a.query_key_value.weight)),
                    b_qkv=None if a.query_key_value.bias is None else p(qkv(a.query_key_value.bias)),
                    w_o=p(a.dense.weight),
                    b_o=opt(a.dense.bias),
                    w_up=p(m.dense_h_to_4h.weight),
                    b_up=opt(m.dense_h_to_4h.bias),
                    w_down=p(m.dense_4h_to_h.weight),
                    b_down=opt(m.dense_4h_to_h.bias),
                )
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in[input_ids]  # [N, D]

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w, N, H, hd = self.layers[i], x.shape[0], self.H, self.hd
        qkv = linear(layer_norm(x, *w.ln1, self.eps), w.w_qkv, w.b_qkv)  # [N, 3*H*hd]
        q, k, v = (t.view(N, H, hd) for t in qkv.chunk(3, dim=-1))  # [N, H, hd] each
        attn = linear(ctx.attend(i, q, k, v).reshape(N, H * hd), w.w_o, w.b_o)  # [N, D]
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self._mlp(w, layer_norm(x, *w.ln2, self.eps))
        x = x + attn
        return x + self._mlp(w, layer_norm(x, *w.ln2, self.eps))

    def _mlp(self, w: _NeoXLayer, h: torch.Tensor) -> torch.Tensor:
        return linear(self.act(linear(h, w.w_up, w.b_up)), w.w_down, w.b_down)  # [N, D]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, *self.ln_f, self.eps)
