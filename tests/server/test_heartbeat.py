"""The lease heartbeat survives a claim racing its release of stale tokens (it died on a KeyError in the
soak, after which every claim of that replica expired mid-turn)."""

from __future__ import annotations

import asyncio

from server.conversation.replicas import Replicas


class SlowRedis:
    """Answers every script after yielding to the event loop, as a real round trip does."""

    def __init__(self) -> None:
        self.calls = 0

    async def eval(self, *args: object) -> list[int]:
        self.calls += 1
        await asyncio.sleep(0.01)
        return []


async def test_renew_tolerates_a_claim_that_drops_a_stale_token_meanwhile():
    redis = SlowRedis()
    replicas = Replicas(redis, "replica-a", lease_ms=3000)
    replicas._stale["s1"] = "replica-a|p|old"

    async def claim_meanwhile() -> None:
        await asyncio.sleep(0.015)  # inside the release round trip of _renew
        replicas._stale.pop("s1", None)  # what a successful claim of s1 does

    await asyncio.gather(replicas._renew(), claim_meanwhile())
    assert "s1" not in replicas._stale and redis.calls == 2
