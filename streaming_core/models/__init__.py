"""Own compact implementations of the decoder families StreamingLLM covers, built from transformers models."""

from __future__ import annotations

from typing import Any

import torch

from .base import DecoderModel
from .falcon import FalconModel
from .llama import LlamaModel
from .mpt import MptModel
from .neox import NeoXModel

_FAMILIES: dict[str, type[DecoderModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "gpt_neox": NeoXModel,
    "falcon": FalconModel,
    "mpt": MptModel,
}


def register(model_type: str, cls: type[DecoderModel]) -> None:
    _FAMILIES[model_type] = cls


def build_model(hf_model: Any, dtype: torch.dtype, device: torch.device | str) -> DecoderModel:
    """Wrap a transformers causal LM's weights in our implementation of its family."""
    model_type = hf_model.config.model_type
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {sorted(_FAMILIES)}")
    return _FAMILIES[model_type](hf_model, dtype, device)


__all__ = ["DecoderModel", "build_model", "register"]
