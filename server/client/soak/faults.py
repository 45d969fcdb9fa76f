"""The fault injector: Redis freezes and restarts and replica kills, each declared as an outage window.

A window runs from the moment the fault is injected to the moment the system is whole again (Redis
answers, the replica is healthy), plus a recovery allowance. Only answers to requests that overlap a
window may be 5xx, error events or connection failures; anywhere else they are bugs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from .cluster import Cluster

log = logging.getLogger(__name__)

FAULTS = ("redis", "disconnect", "delete", "kill-replica")
"""What --faults accepts; 'disconnect' and 'delete' are client behaviours, the rest are injected here."""
REDIS_FREEZE_S = 8.0
REDIS_DOWN_S = 2.0
FREEZE_ANSWER_S = 4.0
"""A request that starts in a Redis freeze must be answered (a 503 with Retry-After, say) within this long
while Redis is still frozen, not held until Redis wakes up. The server's defaults (0.5 s socket timeout,
2 retries) bound one Redis round trip to ~1.7 s, and a request makes at most two before it answers."""


@dataclass
class Outage:
    kind: str
    start: float
    end: float
    allowance: float
    """Seconds after `end` during which errors still count as the outage's."""

    def covers(self, start: float, end: float) -> bool:
        """A request that ran from `start` to `end` overlaps the window (its allowance included)."""
        return start <= self.end + self.allowance and end >= self.start

    def holds(self, start: float, answered: float) -> bool:
        """A request started in a Redis freeze, early enough to be answered within it, waited longer."""
        early = self.start <= start <= self.end - FREEZE_ANSWER_S
        return self.kind == "redis-freeze" and early and answered - start > FREEZE_ANSWER_S

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule(faults: set[str], duration: float) -> list[tuple[float, str]]:
    """(time, kind) of the injected faults, spread over the first 70% of the run so that the rest of
    it shows the recovery; each kind once per 60 s of run (at least once)."""
    kinds: list[str] = []
    if "redis" in faults:
        kinds += ["redis-freeze", "redis-restart"]
    if "kill-replica" in faults:
        kinds.insert(1 if kinds else 0, "kill-replica")
    rounds = max(1, int(duration // 60))
    events = kinds * rounds
    return [(duration * 0.7 * (i + 1) / (len(events) + 1), kind) for i, kind in enumerate(events)]


class Injector:
    def __init__(self, cluster: Cluster, t0: float, recovery: float, lease: float, seed: int) -> None:
        self.cluster, self.t0, self.recovery, self.lease = cluster, t0, recovery, lease
        self.outages: list[Outage] = []
        self.failures: list[str] = []
        """Faults that could not be injected or recovered from (the soak fails)."""
        self.rng = random.Random(seed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def in_outage(self, start: float, end: float) -> bool:
        return any(o.covers(start, end) for o in self.outages)

    async def run(self, plan: list[tuple[float, str]]) -> None:
        """Inject each fault at its time, one at a time (a fault never starts before the last is over)."""
        for at, kind in plan:
            await asyncio.sleep(max(0.0, at - self.now()))
            try:
                await self.inject(kind)
            except Exception as e:
                log.exception("fault %s failed", kind)
                self.failures.append(f"{kind}: {type(e).__name__}: {e}")
                if self.outages and self.outages[-1].kind == kind:
                    self.outages[-1].end = self.now()

    async def inject(self, kind: str) -> None:
        outage = Outage(kind, self.now(), float("inf"), self.recovery)
        self.outages.append(outage)  # declared before the fault happens: in force at once
        redis = self.cluster.redis
        if kind == "redis-freeze":
            assert redis is not None
            redis.freeze()
            try:
                await asyncio.sleep(REDIS_FREEZE_S)
            finally:
                redis.thaw()
        elif kind == "redis-restart":
            assert redis is not None
            await asyncio.to_thread(redis.kill)
            await asyncio.sleep(REDIS_DOWN_S)
            await asyncio.to_thread(redis.restart)
        elif kind == "kill-replica":
            node = self.rng.choice(self.cluster.replicas)
            outage.kind = f"kill-replica:{node.name}"
            # a SIGKILL'd replica's session claims live on in Redis until its lease expires
            outage.allowance = self.recovery + self.lease
            await asyncio.to_thread(node.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(node.start)
        else:
            raise ValueError(f"unknown fault {kind!r}")
        outage.end = self.now()
        log.info("outage %s: %.1f-%.1f s", outage.kind, outage.start, outage.end)
