"""The server's Redis client bounds every command in all, reconnects included: against a frozen Redis
(SIGSTOP: the kernel still accepts connections) a command started well into the freeze, while other
requests keep failing and reconnecting, is refused within the deadline instead of waiting for the thaw."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from server.redis_client import UNAVAILABLE, connect
from server.redis_embedded import free_port
from server.settings import RedisLimits

from .helpers import freezable_redis

FREEZE_S = 6.0
PROBE_AT_S = (1.0, 3.0, 4.5)


async def _probe(client, delay: float) -> tuple[float, BaseException | None]:
    await asyncio.sleep(delay)
    start = time.monotonic()
    try:
        await client.get("probe")
    except UNAVAILABLE as e:
        return time.monotonic() - start, e
    return time.monotonic() - start, None


async def _busy(client, until: float) -> None:
    """A request that keeps meeting the frozen Redis, as the soak's streams do."""
    while time.monotonic() < until:
        with contextlib.suppress(UNAVAILABLE):
            await client.set("busy", "1")


def test_commands_started_during_a_freeze_are_refused_within_the_deadline(tmp_path: Path) -> None:
    limits = RedisLimits()
    with freezable_redis(tmp_path / "redis", port=free_port()) as server:
        assert server.pid

        async def scenario() -> list[tuple[float, BaseException | None]]:
            client = connect(server.url, limits)
            await asyncio.gather(*(client.ping() for _ in range(16)))  # a pool of open connections
            os.kill(server.pid, signal.SIGSTOP)
            try:
                until = time.monotonic() + FREEZE_S
                busy = [asyncio.create_task(_busy(client, until)) for _ in range(16)]
                probes = await asyncio.gather(*(_probe(client, d) for d in PROBE_AT_S))
                await asyncio.gather(*busy)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await client.ping()  # and it answers again once thawed
            await client.aclose()
            return probes

        probes = asyncio.run(scenario())
    for delay, (elapsed, error) in zip(PROBE_AT_S, probes, strict=True):
        assert isinstance(error, UNAVAILABLE), f"probe at +{delay}s got {error!r}"
        assert elapsed < limits.command_deadline_seconds + 0.5, (
            f"probe at +{delay}s refused after {elapsed:.2f}s"
        )
