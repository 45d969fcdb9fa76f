"""Small factories shared by the engine tests: tiny random-weight models and a pool-backed stream driver."""

from __future__ import annotations

import torch

from streaming_core.batch import BatchPlan, SeqChunk
from streaming_core.config import CacheConfig
from streaming_core.kv_pool import KVPool
from streaming_core.models import DecoderModel, build_model
from streaming_core.runner import ModelRunner


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=0.2,  # sharp attention, so that position errors show in the logits
    )
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def make_runner(
    model: DecoderModel, sink_tokens: int = 4, window: int = 28, num_slots: int = 4, dtype=torch.float32
) -> ModelRunner:
    cache = CacheConfig(sink_tokens=sink_tokens, window=window, num_slots=num_slots, prefill_chunk=64)
    return ModelRunner(model, KVPool(cache, model.kv_shape, dtype, torch.device("cpu")))


def wrap(hf_model, dtype=torch.float32) -> DecoderModel:
    return build_model(hf_model, dtype, "cpu")


def stream_logits(
    runner: ModelRunner, tokens: list[int], chunk: int = 1, slot: int = 0, offset: int = 0
) -> torch.Tensor:
    """Push a token stream through one slot, `chunk` tokens per forward; logits for every token.

    `offset` shifts the stream index of every window token (the sinks stay at 0..S-1), as if that many
    tokens had streamed through the slot before.
    """
    S = runner.pool.cache.sink_tokens
    out = []
    i = 0
    while i < len(tokens):
        n = min(chunk, len(tokens) - i, S - i) if i < S else min(chunk, len(tokens) - i)
        start = i if i < S else i + offset
        step = runner.run(BatchPlan((SeqChunk(slot, start, tuple(tokens[i : i + n]), "all"),)))
        out.append(step.logits[0])
        i += n
    return torch.cat(out)
