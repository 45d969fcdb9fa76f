"""A conversation well past the cache's capacity: the Redis record stays bounded and the pinned system
prompt is still in the sinks."""

from __future__ import annotations

import asyncio

import pytest

from server.conversation.templates import CONTEXT_CHARS, encode, system_head
from streaming_core.sampler import SamplingParams

from .helpers import generate, new_id, user

SYSTEM = {"role": "system", "content": "You are a poet. Keep every answer short."}
FILLER = "The quick brown fox jumps over the lazy dog near the old river bank. " * 25


async def test_record_stays_bounded_and_the_system_prompt_stays_pinned(manager, engine, store):
    tok, cache = manager.tokenizer, engine.config.cache
    sid = new_id()
    sizes = []
    for i in range(4):
        messages = [SYSTEM, user(f"{i}: {FILLER}")] if i == 0 else [user(f"{i}: {FILLER}")]
        plan = await manager.plan_chat("me", sid, messages)
        assert plan.mode == ("new" if i == 0 else "delta")
        await generate(manager, plan, SamplingParams(temperature=0, max_tokens=2))
        sizes.append(sum(len(k) + len(v) for k, v in (await store.redis.hgetall(store.key(sid))).items()))
    record = await store.get(sid)
    assert record is not None and record.tokens_seen > 1.2 * cache.capacity
    assert record.cache_tokens == cache.capacity == len(record.sinks) + len(record.tail)
    assert [m["role"] for m in record.context] == ["system", "user"]
    assert all(len(m["content"]) <= CONTEXT_CHARS for m in record.context)
    assert record.chain_len == 9 and len(record.chain_first) == len(record.chain_last) == 64
    assert max(sizes) < 4 * cache.capacity + 4 * CONTEXT_CHARS + 2048
    assert abs(sizes[-1] - sizes[-2]) < 64, f"the record grows with the conversation: {sizes}"

    head = encode(tok, system_head(tok, [SYSTEM, user("x")]))
    assert record.pin_tokens == len(head) > cache.sink_tokens
    if not manager.supports_sinks:
        pytest.xfail("engine.submit takes no sink_tokens: the system prompt cannot be pinned")
    state = await asyncio.to_thread(engine.session_state, sid)
    assert record.sink_tokens == len(head) and state.sinks == head and state.tokens_seen == record.tokens_seen
