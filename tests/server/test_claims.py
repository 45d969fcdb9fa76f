"""Session claims on a real Redis: a release that fails while Redis is frozen is done once it answers, and
a replica's restarted process frees its dead predecessor's claims at once."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.conversation.replicas import Replicas
from server.redis_client import UNAVAILABLE, connect
from server.redis_embedded import EmbeddedRedis
from server.settings import RedisLimits

from .helpers import freezable_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with freezable_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def client(own_redis: EmbeddedRedis) -> AsyncIterator:
    redis = connect(own_redis.url, RedisLimits(socket_timeout_seconds=0.3, connect_timeout_seconds=0.3))
    yield redis
    await redis.aclose()


async def test_a_release_that_failed_while_redis_was_frozen_is_done_later(own_redis, client) -> None:
    a, b = Replicas(client, "a", lease_ms=10_000), Replicas(client, "b", lease_ms=10_000)
    await a.start()
    await b.start()
    try:
        sid = f"s-{uuid.uuid4().hex[:6]}"
        assert await a.claim(sid)
        assert own_redis.pid
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            await a.release(sid)  # cannot reach Redis: kept to release later, not raised
            with pytest.raises(UNAVAILABLE):
                await b.claim(sid)
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        # Both timed-out scripts may or may not run once Redis reads its socket again: whichever claim is
        # left, a's next heartbeat releases a's, and b's own next claim replaces b's.
        await a._renew()
        assert await b.claim(sid)
        await b.release(sid)
        assert await a.claim(sid)
    finally:
        await a.stop()
        await b.stop()


async def test_a_restarted_replica_frees_the_claims_of_its_dead_process(client) -> None:
    sid = f"s-{uuid.uuid4().hex[:6]}"
    first = Replicas(client, "r", lease_ms=10_000)
    await first.start()
    assert await first.claim(sid)
    first._task.cancel()  # type: ignore[union-attr]  # SIGKILLed: no release, the lease left to expire
    other = Replicas(client, "other", lease_ms=10_000)
    await other.start()
    assert not await other.claim(sid)  # r's lease is alive: its claim holds
    second = Replicas(client, "r", lease_ms=10_000)
    await second.start()  # r's new process takes over r's lease
    assert await other.claim(sid)  # the dead process's claim no longer counts
    await other.stop()
    await second.stop()
