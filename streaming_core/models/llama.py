"""Llama family: Llama-2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2. RMSNorm, RoPE, GQA, SwiGLU.

Weights are fused at load (q|k|v and gate|up) so that a layer is five matmuls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..attention import PositionalSpec, StepContext
from ..kv_pool import KVShape
from .base import DecoderModel, param, rms_norm


class LlamaModel(DecoderModel):
    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        cfg = hf_model.config
        core = hf_model.model
        self.H = cfg.num_attention_heads
        self.kvh = getattr(cfg, "num_key_value_heads", None) or self.H
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.eps = float(cfg.rms_norm_eps)
        self.vocab_size = cfg.vocab_size
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        n_layers = cfg.num_hidden_layers
        self.kv_shape = KVShape(layers=n_layers, kv_heads=self.kvh, head_dim=self.hd)
        rot = core.rotary_emb
        self.spec = PositionalSpec(
            kind="rope",
            scale=self.hd**-0.5,
            rotary_dim=rot.inv_freq.shape[0] * 2,
            inv_freq=rot.inv_freq.detach().to(torch.float64).cpu(),
            rope_scaling=float(getattr(rot, "attention_scaling", 1.0)),
        )
        p = lambda t: param(t, dtype, device)  # noqa: E731
        self.embed_tokens = p(core.embed_tokens.weight)
        tied = hf_model.lm_head.weight.data_ptr() == core.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed_tokens if tied else p(hf_model.lm_head.weight)
        self.norm = p(core.norm.weight)
        self.w_qkv, self.b_qkv, self.w_o, self.w_gate_up, self.w_down, self.ln1, self.ln2 = (
            [] for _ in range(7)
        )
        for layer in core.layers:
            a, m = layer.self_attn, layer.mlp
            self.w_qkv.append(p(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])))
            has_bias = a.q_proj.bias is not None
            self.b_qkv.append(
                p(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])) if has_bias else None
            )
            self.w_o.append(p(a.o_proj.weight))
            self.w_gate_up.append(p(torch.cat([m.gate_proj.weight, m.up_proj.weight])))
            self.w_down.append(p(m.down_proj.weight))
            self.ln1.append(p(layer.input_layernorm.weight))
            self.ln2.append(p(layer.post_attention_layernorm.weight))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids]  # [N, D]

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        N = x.shape[0]
        qkv = F.linear(rms_norm(x, self.ln1[i], self.eps), self.w_qkv[i], self.b_qkv[i])  # [N, (H+2kvh)*hd]
        q, k, v = qkv.split([self.H * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        attn = ctx.attend(
            i, q.view(N, self.H, self.hd), k.view(N, self.kvh, self.hd), v.view(N, self.kvh, self.hd)
        )
        x = x + F.linear(attn.reshape(N, -1), self.w_o[i])
        gate, up = F.linear(rms_norm(x, self.ln2[i], self.eps), self.w_gate_up[i]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down[i])

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm, self.eps)
