"""Server-side fixtures: a real Redis (the embedded one, in a temporary dir) and an engine on the real default model."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from server.conversation.manager import ConversationManager
from server.conversation.store import SessionStore
from server.redis_embedded import EmbeddedRedis
from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.loader import LoadedModel, eos_token_ids, load_model


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-data"))
    yield server.start()
    server.stop(force=True)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """Dense fp32 weights: the session-equals-stateless tests compare greedy tokens exactly, which holds
    for fp32 (float reordering only); the int8 default rounds activations to bf16 differently per batch
    bucket, so its equivalence is a tolerance (tests/streaming_core/test_linear.py)."""
    return load_model("default", weights="dense")


def make_engine(loaded: LoadedModel, num_slots: int = 8) -> Engine:
    cache = CacheConfig(sink_tokens=4, window=1020, num_slots=num_slots)
    return Engine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(cache=cache),
        eos_token_ids(loaded.tokenizer, loaded.hf_config),
    )


@pytest.fixture(scope="session")
def engine(default_model: LoadedModel) -> Iterator[Engine]:
    e = make_engine(default_model)
    e.start()
    yield e
    e.stop()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[SessionStore]:
    """A store of its own per test (its own key prefix), so that owner indexes do not mix."""
    s = SessionStore.from_url(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}", ttl_seconds=3600)
    yield s
    await s.redis.aclose()


@pytest.fixture
def manager(engine: Engine, store: SessionStore) -> ConversationManager:
    return ConversationManager(engine, engine.tokenizer, store, model_name="smollm2", replica_id="test")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The default model's tokenizer alone (no weights): enough for template tests."""
    from transformers import AutoTokenizer

    from streaming_core.loader import cached_gguf_dir, default_gguf_path

    return AutoTokenizer.from_pretrained(cached_gguf_dir(default_gguf_path()))
