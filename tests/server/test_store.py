"""SessionStore on a real Redis: whole-record writes, TTLs on the record and the owner index, deletion."""

from __future__ import annotations

import hashlib

import pytest
from redis.exceptions import TimeoutError

from server.conversation.replicas import Fence, Replicas
from server.conversation.store import SessionRecord, SessionStore, owner_id, pack_tokens, unpack_tokens


def record(sid: str = "s1", owner: str = "alice", **kw: object) -> SessionRecord:
    base = SessionRecord(
        id=sid,
        owner=owner,
        model="m",
        created_at=1.5,
        updated_at=2.25,
        turns=3,
        tokens_seen=5000,
        cache_tokens=1024,
        context=[{"role": "system", "content": "Sé bref 🙂"}, {"role": "user", "content": "x"}],
        reply="ok\n",
        kv_back="\n\n",
        sinks=[1, 2, 3, 4],
        tail=[49151, 0, 7] * 300,
    )
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def test_owner_id():
    assert owner_id(None) == "anonymous" and owner_id("") == "anonymous"
    assert owner_id("sk-1") == hashlib.sha256(b"sk-1").hexdigest() == owner_id(" sk-1 ")


def test_token_packing_is_compact_and_exact():
    tokens = [0, 1, 2**31 - 1, 49151]
    assert unpack_tokens(pack_tokens(tokens)) == tokens and len(pack_tokens(tokens)) == 16


async def test_put_get_roundtrip_with_ttls(store: SessionStore):
    rec = record()
    await store.put(rec)
    assert await store.get("s1") == rec
    assert 0 < await store.ttl("s1") <= store.ttl_seconds
    assert 0 < await store.redis.ttl(store.owner_key("alice")) <= store.ttl_seconds
    assert await store.redis.type(store.key("s1")) == b"hash"
    await store.redis.expire(store.key("s1"), 10)
    rec.turns = 4
    await store.put(rec)
    assert await store.ttl("s1") > 10, "a turn refreshes the TTL"
    assert (await store.get("s1")).turns == 4


async def test_index_delete_and_expired_members(store: SessionStore):
    await store.put(record("a"))
    await store.put(record("b"))
    await store.put(record("c", owner="bob"))
    assert await store.ids("alice") == ["a", "b"] and await store.ids("bob") == ["c"]
    await store.delete(record("a"))
    assert await store.get("a") is None and await store.ids("alice") == ["b"]
    await store.redis.delete(store.key("b"))
    assert await store.get_many(["b", "c"]) == [None, record("c", owner="bob")]
    await store.forget("alice", ["b"])
    assert await store.ids("alice") == []
    assert await store.ttl("a") == -2


async def test_fenced_put_needs_the_claim_token_and_beats_the_deadline(store: SessionStore):
    replicas = Replicas(store.redis, "r1", prefix=store.prefix, lease_ms=5000)
    await replicas.start()
    try:
        assert await replicas.claim("s1")
        fence = replicas.fence("s1", timeout_s=1.0)
        assert fence is not None
        assert await store.put(record(turns=1), fence)
        forged = Fence(fence.key, "r2|0|0", fence.deadline_ms)
        assert not await store.put(record(turns=2), forged)  # not the claim's token: refused
        late = Fence(fence.key, fence.token, fence.deadline_ms - 5000)
        with pytest.raises(TimeoutError):
            await store.put(record(turns=3), late)  # arrived after its sender gave up: refused
        assert (await store.get("s1")).turns == 1  # type: ignore[union-attr]
        await replicas.release("s1")
        assert not await store.put(record(turns=4), replicas.fence("s1", 1.0) or fence)  # released
        assert (await store.get("s1")).turns == 1  # type: ignore[union-attr]
    finally:
        await replicas.stop()
