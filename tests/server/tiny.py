"""An engine on a 2-layer random Llama with the default model's tokenizer (so its real chat template):
fast enough to put thousands of requests through the real app."""

from __future__ import annotations

from typing import Any

import torch

from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.models import build_model

from ..streaming_core.helpers import tiny_llama


def tiny_engine(tokenizer: Any, num_slots: int = 4) -> Engine:
    hf = tiny_llama(seed=1, vocab_size=len(tokenizer), max_position_embeddings=2048)
    cache = CacheConfig(sink_tokens=4, window=252, num_slots=num_slots, prefill_chunk=128)
    return Engine(build_model(hf, torch.float32, "cpu"), tokenizer, EngineConfig(cache=cache), {0})
