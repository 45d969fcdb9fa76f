"""What every model family provides to the runner: embed -> layers (attention via the step context) -> logits."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import PositionalSpec, StepContext
from ..kv_pool import KVShape


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
        x = self.embed(input_ids)  # [N, D]
        for i in range(self.kv_shape.layers):
            x = self.layer_forward(i, x, ctx)
        return self.final_norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, D] -> fp32 logits [M, V]; only rows that are sampled or scored get here."""
        return torch.matmul(hidden, self.lm_head.t()).float()


def param(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A detached, contiguous copy of a weight in the engine's dtype and device."""
    return t.detach().to(device=device, dtype=dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 like the reference, cast back to the activations' dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
