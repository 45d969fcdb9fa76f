"""The real default model (SmolLM2-135M-Instruct) through the engine: greedy chat equals transformers' generate,
alone and batched with other conversations."""

from __future__ import annotations

import pytest
import torch

from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.loader import eos_token_ids, load_model
from streaming_core.sampler import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
]


@pytest.fixture(scope="module")
def loaded():
    return load_model("default", dtype=torch.float32, device="cpu", keep_hf=True, weights="dense")


def chat_tokens(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def hf_answer(loaded, tokens: list[int], n: int) -> list[int]:
    ids = torch.tensor([tokens])
    out = loaded.hf_model.generate(
        ids, max_new_tokens=n, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id
    )
    return out[0, len(tokens) :].tolist()


def test_greedy_chat_through_the_engine_equals_generate(loaded):
    eos = eos_token_ids(loaded.tokenizer, loaded.hf_config)
    engine = Engine(
        loaded.model, loaded.tokenizer, EngineConfig(cache=CacheConfig(4, 1020, num_slots=4)), eos
    )
    prompts = [chat_tokens(loaded.tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0)
    handles = [engine.submit(f"chat-{i}", p, params) for i, p in enumerate(prompts)]
    engine.run_until_done(*handles)
    for h, p in zip(handles, prompts, strict=True):
        events = list(h.stream)
        got = [e.token for e in events if e.token is not None]
        assert got == hf_answer(loaded, p, 24)
        text = "".join(e.text for e in events)
        assert text == loaded.tokenizer.decode(got, skip_special_tokens=True)
    assert "Paris" in loaded.tokenizer.decode(hf_answer(loaded, prompts[0], 24))
