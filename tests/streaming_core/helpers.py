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


def tiny_neox(seed: int = 0, **overrides):
    """Pythia-like: partial rotary (rotary_pct 0.25 -> 4 of 16 features), parallel residual, biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=1024,
        rotary_pct=0.25,
        hidden_act="gelu",
        initializer_range=0.2,
    )
    kw.update(overrides)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**kw)).eval()


def tiny_falcon(seed: int = 0, **overrides):
    """Falcon-7B-like by default: multi-query (one KV head), parallel attention, one LayerNorm."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=1024,
        alibi=False,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        initializer_range=0.2,
    )
    kw.update(overrides)
    return FalconForCausalLM(FalconConfig(**kw)).eval()


def tiny_mpt(seed: int = 0, attn_config: dict | None = None, **overrides):
    """MPT with ALiBi (alibi_bias_max 8), LayerNorms without bias, no linear biases."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        expansion_ratio=2,
        vocab_size=128,
        max_seq_len=1024,
        attn_config=dict(alibi=True, alibi_bias_max=8, **(attn_config or {})),
        initializer_range=0.2,
    )
    kw.update(overrides)
    return MptForCausalLM(MptConfig(**kw)).eval()


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
