"""What every model family provides to the runner: embed -> layers (attention via the step context) -> logits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from .. import fused
from ..attention import PositionalSpec, StepContext
from ..kv_pool import KVShape
from ..linear import KernelReport, Linear, LinearSlot, linear, prepare_linears


class DecoderModel:
    """A decoder-only LM over flat token rows [N]; attention goes through `StepContext.attend`.

    Plain tensors, no nn.Module: weights are converted once from the transformers model and fused.
    """

    spec: PositionalSpec
    kv_shape: KVShape
    vocab_size: int
    max_context: int | None
    lm_head: torch.Tensor

    def __init__(self, hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_forward(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids [N] -> final hidden states [N, D] (normed)."""
        return self.forward(input_ids, ctx)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """`__call__` without its inference mode: what torch.compile traces (see runner.DecodeGraph)."""
        x = self.embed(input_ids)  # [N, D]
        for i in range(self.kv_shape.layers):
            x = self.layer_forward(i, x, ctx)
        return self.final_norm(x)

    head: Linear | None = None
    """The LM head as a tuned `Linear` once `prepare` ran (`lm_head` stays the plain, possibly tied, tensor)."""
    kernels: KernelReport | None = None
    """What `prepare` chose and measured."""

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, D] -> fp32 logits [M, V]; only rows that are sampled or scored get here."""
        return self.project(hidden)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits` without its inference mode."""
        return linear(hidden, self.head if self.head is not None else self.lm_head).float()

    def linear_slots(self) -> Iterator[LinearSlot]:
        """Every matmul weight: fields `w_<role>` (bias `b_<role>`) of the per-layer records, and the head."""
        for layer in getattr(self, "layers", []):
            for f in dataclasses.fields(layer):
                if f.name.startswith("w_"):
                    bias = "b_" + f.name[2:]
                    yield LinearSlot(f.name[2:], layer, f.name, bias if hasattr(layer, bias) else None)
        self.head = self.lm_head  # type: ignore[assignment]  # replaced by its Linear below
        yield LinearSlot("lm_head", self, "head", None)

    def prepare(
        self, weights: str = "dense", cache_dir: Path | None = None, fused_dir: Path | None = None
    ) -> KernelReport:
        """Put every weight in the layouts and kernels measured fastest here for `weights` precision
        (the measurement is reused from `cache_dir` when this machine already made it); with `fused_dir`,
        on the CPU the compiled kernels are loaded (built there once): their matmuls join the candidates,
        and a model that has a fused decode layer runs its decode steps on them."""
        on_cpu = self.lm_head.device.type == "cpu" and self.lm_head.dtype == torch.float32
        compiled = fused.load(fused_dir) if fused_dir is not None and on_cpu else None
        # the quantized precisions' int8-activation matmuls live in the same compiled module
        self.kernels = prepare_linears(self.linear_slots(), weights, cache_dir=cache_dir, fused=compiled)
        if self.has_fused_decode:
            self.fused = compiled
        return self.kernels

    def default_kv_dtype(self) -> torch.dtype:
        """The KV pool's dtype under kv_dtype 'auto': bf16 for fp32 activations on the CPU with quantized
        weights (their outputs are rounded already; bf16 halves the KV bytes every step reads, as well as
        what a session holds and offloads), else the activations' dtype (dense fp32 stays exact)."""
        dtype = self.lm_head.dtype
        quantized = self.kernels is not None and self.kernels.mode != "dense"
        if dtype == torch.float32 and self.lm_head.device.type == "cpu" and quantized:
            return torch.bfloat16
        return dtype

    has_fused_decode = False
    """Whether `layer_forward` runs on the fused CPU kernels when a step offers them (StepContext.fused)."""
    fused: ModuleType | None = None
    """The compiled kernels, once `prepare` loaded them (the runner hands them to each step)."""


def param(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A detached, contiguous copy of a weight in the engine's dtype and device."""
    return t.detach().to(device=device, dtype=dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 like the reference, cast back to the activations' dtype. In fp32 that is
    torch's fused op (one call instead of eight, bit-identical: tests/streaming_core/test_llama_equivalence)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation a transformers config names (hidden_act / activation)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def ungroup_qkv(t: torch.Tensor, kv_heads: int, q_per_kv: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a fused qkv weight [rows, D] or bias [rows] laid out per KV group as
    [kv_heads, q_per_kv + 2, head_dim] (q heads of the group, then its k, then its v) into
    [q of every head | k of every kv head | v of every kv head], so that one split yields q, k, v.

    GPT-NeoX's per-head [H, 3, hd] is the case kv_heads = H, q_per_kv = 1; Falcon's multi-query
    [H + 2, hd] is kv_heads = 1, q_per_kv = H.
    """
    g = t.view(kv_heads, q_per_kv + 2, head_dim, *t.shape[1:])  # [kvh, g + 2, hd, (D)]
    q = g[:, :q_per_kv].reshape(kv_heads * q_per_kv * head_dim, *t.shape[1:])  # [H*hd, (D)]
    k = g[:, q_per_kv].reshape(kv_heads * head_dim, *t.shape[1:])  # [kvh*hd, (D)]
    v = g[:, q_per_kv + 1].reshape(kv_heads * head_dim, *t.shape[1:])  # [kvh*hd, (D)]
    return torch.cat((q, k, v))


def rope_spec(rotary_emb: Any, head_dim: int) -> PositionalSpec:
    """RoPE spec from a transformers rotary embedding module; rotary_dim follows its inv_freq, so
    partial rotary (GPT-NeoX rotary_pct) rotates exactly the features transformers rotates."""
    return PositionalSpec(
        kind="rope",
        scale=head_dim**-0.5,
        rotary_dim=rotary_emb.inv_freq.shape[0] * 2,
        inv_freq=rotary_emb.inv_freq.detach().to(torch.float64).cpu(),
        rope_scaling=float(getattr(rotary_emb, "attention_scaling", 1.0)),
    )
