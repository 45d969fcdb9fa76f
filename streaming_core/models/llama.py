"""Llama family: Llama-2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2. RMSNorm, RoPE, GQA, SwiGLU.

Weights are fused at load (q|k|v and gate|up) so that a layer is five matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import PositionalSpec, StepContext
from ..kv_pool import KVShape
from ..linear import Kernel, Linear, bucket_index, linear, linear_add, linear_native
from .base import DecoderModel, param, rms_norm


@dataclass
class _LlamaLayer:
    ln1: torch.Tensor  # [D]
    ln2: torch.Tensor  # [D]
    w_qkv: torch.Tensor | Linear  # [(H + 2*kvh)*hd, D], rows as [q | k | v]
    b_qkv: torch.Tensor | None  # Qwen2 only
    w_o: torch.Tensor | Linear  # [D, H*hd]
    w_gate_up: torch.Tensor | Linear  # [2F, D], rows as [gate | up]
    w_down: torch.Tensor | Linear  # [D, F]


def _kernel(w: torch.Tensor | Linear, bucket: int) -> tuple[Kernel, bool]:
    """A prepared weight's kernel for the step's row bucket and whether it reads bf16."""
    assert isinstance(w, Linear), "the fused path runs on prepared weights"
    return w.at(bucket)


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
        self.layers: list[_LlamaLayer] = []
        self._kernels_by_bucket: dict[int, list[list[tuple[Kernel, bool]]]] = {}
        for layer in core.layers:
            a, m = layer.self_attn, layer.mlp
            bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append(
                _LlamaLayer(
                    ln1=p(layer.input_layernorm.weight),
                    ln2=p(layer.post_attention_layernorm.weight),
                    w_qkv=p(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                    b_qkv=None if bias is None else p(bias),
                    w_o=p(a.o_proj.weight),
                    w_gate_up=p(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                    w_down=p(m.down_proj.weight),
                )
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids]  # [N, D]

    has_fused_decode = True

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.fused is not None and self.head is not None:  # prepared weights, a decode step on the CPU
            return self._fused_forward(input_ids, ctx)
        return super().forward(input_ids, ctx)

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w, N = self.layers[i], x.shape[0]
        qkv = linear(rms_norm(x, w.ln1, self.eps), w.w_qkv, w.b_qkv)  # [N, (H+2kvh)*hd]
        q, k, v = qkv.split([self.H * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        attn = ctx.attend(
            i, q.view(N, self.H, self.hd), k.view(N, self.kvh, self.hd), v.view(N, self.kvh, self.hd)
        )
        x = linear_add(x, attn.reshape(N, -1), w.w_o)
        # gate|up stays in its kernel's dtype through SiLU into the down projection (bf16 when quantized)
        gate, up = linear_native(rms_norm(x, w.ln2, self.eps), w.w_gate_up).chunk(2, dim=-1)  # [N, F] each
        return linear_add(x, F.silu(gate) * up, w.w_down)

    def _fused_forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """`forward` for a decode step on the fused CPU kernels: per layer four kernel calls besides the
        four matmuls. Each residual add is folded into the RMSNorm after it, which writes the dtype the
        next matmul reads (bf16 into a quantized kernel); the final hidden states stay fp32."""
        f, eps = ctx.fused, self.eps
        assert f is not None
        kernels = self._step_kernels(bucket_index(input_ids.shape[0]))
        x = self.embed(input_ids)  # [B, D] fp32, a fresh tensor: the residual stream is updated in place
        h = f.add_rms_norm_(x, None, self.layers[0].ln1, eps, kernels[0][0][1])  # [B, D]
        for i, w in enumerate(self.layers):
            (qkv, _), (o, o_bf16), (gate_up, gu_bf16), (down, _) = kernels[i]
            h = f.add_rms_norm_(x, o(ctx.attend_qkv(i, qkv(h), o_bf16)), w.ln2, eps, gu_bf16)
            last = i + 1 == len(self.layers)
            norm, bf16 = (self.norm, False) if last else (self.layers[i + 1].ln1, kernels[i + 1][0][1])
            h = f.add_rms_norm_(x, down(f.silu_mul(gate_up(h))), norm, eps, bf16)
        return h  # [B, D] final-normed, fp32

    def _step_kernels(self, bucket: int) -> list[list[tuple[Kernel, bool]]]:
        """Per layer, the (kernel, reads bf16) of q|k|v, o, gate|up and down for one row bucket."""
        if bucket not in self._kernels_by_bucket:
            self._kernels_by_bucket[bucket] = [
                [_kernel(m, bucket) for m in (w.w_qkv, w.w_o, w.w_gate_up, w.w_down)] for w in self.layers
            ]
        return self._kernels_by_bucket[bucket]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm, self.eps)
