"""Claims and commits across replicas are fenced by a token, and a session recorded under another model
identity is refused: two ConversationManagers ("replicas" A and B, each with its own engine around the
real default model) on one real Redis."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from server.conversation.errors import ConversationError
from server.conversation.identity import model_identity, vocab_fingerprint
from server.conversation.manager import ConversationManager
from server.conversation.replicas import Replicas
from server.conversation.store import SessionStore
from streaming_core.engine import Engine
from streaming_core.loader import LoadedModel
from streaming_core.sampler import SamplingParams

from .conftest import make_engine
from .helpers import generate, new_id, user

SLOW = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def engine_b(default_model: LoadedModel) -> Iterator[Engine]:
    e = make_engine(default_model, num_slots=2)
    e.start()
    yield e
    e.stop()


@pytest.fixture
async def prefix(store: SessionStore) -> str:
    return store.prefix


async def replica(
    redis_url: str, prefix: str, name: str, engine: Engine, lease_ms: int
) -> ConversationManager:
    store = SessionStore.from_url(redis_url, prefix=prefix, ttl_seconds=3600)
    replicas = Replicas(store.redis, name, prefix=prefix, lease_ms=lease_ms)
    ident = model_identity("smollm2", engine.tokenizer, engine.config.cache)
    return ConversationManager(
        engine,
        engine.tokenizer,
        store,
        model_name="smollm2",
        replica_id=name,
        replicas=replicas,
        identity=ident,
    )


@pytest.fixture
async def pair(redis_url: str, prefix: str, engine: Engine, engine_b: Engine) -> AsyncIterator[tuple]:
    # A's heartbeat never runs: A is a replica cut off from Redis (or paused) long enough for its claim to
    # expire while its turn still runs; B renews normally.
    a = await replica(redis_url, prefix, "replica-a", engine, lease_ms=800)
    b = await replica(redis_url, prefix, "replica-b", engine_b, lease_ms=15_000)
    assert b.replicas is not None
    await b.replicas.start()
    yield a, b
    await b.replicas.stop()
    for m in (a, b):
        await m.store.redis.aclose()


async def test_a_replica_whose_claim_expired_can_neither_renew_nor_commit(pair) -> None:
    a, b = pair
    sid = new_id("fenced")
    await generate(b, await b.plan_chat("me", sid, [user("Hello!")], mode="delta"))
    slow = await a.plan_chat("me", sid, [user("Tell me a long story.")], mode="delta")
    handle = a.submit(slow, SLOW, asyncio.get_running_loop())
    await asyncio.sleep(1.2)  # A's claim expires in the middle of its turn
    taken = await b.plan_chat("me", sid, [user("Are you there?")], mode="delta")
    b_reply = await generate(b, taken)
    assert b_reply.finish in ("stop", "length")

    claim_key = a.replicas.claim_key(sid)
    assert await a.replicas._renew() == [sid]  # A's renewal sees the claim is not its own ...
    assert (await a.store.redis.get(claim_key)) is None  # ... and B's released claim stays released
    text, finish = "", ""
    async for event in handle.stream:
        text += event.text
        finish = event.finish_reason or finish
    with pytest.raises(ConversationError) as e:
        await a.commit(slow, text, finish)
    assert (e.value.status, e.value.code) == (409, "session_claim_lost")

    record = await b.store.get(sid)
    assert (
        record is not None and record.turns == 2 and record.replica == "replica-b"
    )  # no turn lost, none twice
    assert record.reply == b_reply.text  # nor A's late turn written over B's
    assert await asyncio.to_thread(a.engine.stats, sid) is None, "A dropped its KV of the refused turn"
    again = await b.plan_chat("me", sid, [user("Thanks.")], mode="delta")
    await generate(b, again)
    assert (await b.store.get(sid)).turns == 3  # type: ignore[union-attr]


async def test_a_claim_renewed_by_its_owner_blocks_others(pair) -> None:
    a, b = pair
    sid = new_id("held")
    plan = await b.plan_chat("me", sid, [user("Hello!")], mode="delta")
    await asyncio.sleep(1.0)
    with pytest.raises(ConversationError) as e:
        await a.plan_chat("me", sid, [user("Me too.")], mode="delta")
    assert e.value.code == "session_busy"
    await generate(b, plan)
    assert (await b.store.get(sid)).turns == 1  # type: ignore[union-attr]


async def test_a_session_of_another_model_identity_is_refused(
    manager: ConversationManager, engine: Engine, store: SessionStore
) -> None:
    manager.identity = model_identity("smollm2", engine.tokenizer, engine.config.cache)
    manager.planner.model_id = manager.identity
    sid = new_id("foreign")
    await generate(manager, await manager.plan_chat("me", sid, [user("Hello!")]))
    assert (await store.get(sid)).model_id == manager.identity  # type: ignore[union-attr]
    other = ConversationManager(
        engine,
        engine.tokenizer,
        store,
        model_name="smollm2",
        replica_id="other",
        identity=f"other-model vocab={uuid.uuid4().hex[:12]} sinks=4 window=1020",
    )
    with pytest.raises(ConversationError) as e:
        await other.plan_chat("me", sid, [user("Hello again!")], mode="delta")
    assert (e.value.status, e.value.code) == (409, "session_model_mismatch")
    assert manager.identity in e.value.message
    assert sid not in other._busy  # refused without leaving the session busy
    assert await other.delete("me", sid)  # but it can be deleted


def test_the_identity_changes_with_the_vocabulary_and_the_cache_shape(engine: Engine) -> None:
    tok, cache = engine.tokenizer, engine.config.cache
    ident = model_identity("m", tok, cache)
    assert ident == model_identity("m", tok, cache) and f"vocab={vocab_fingerprint(tok)}" in ident
    grown = copy.deepcopy(tok)
    grown.add_tokens(["<never-seen-token>"])
    assert vocab_fingerprint(grown) != vocab_fingerprint(tok)
    assert model_identity("m", tok, replace(cache, window=cache.window - 1)) != ident
    assert model_identity("n", tok, cache) != ident
