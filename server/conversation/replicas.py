"""Several replicas on one Redis: each holds a renewed lease, and a session is claimed by one replica per turn.

- Lease: `{prefix}:replica:{id}` exists while the replica lives; a heartbeat renews it every third of
  its TTL. A SIGKILL'd replica's lease simply expires.
- Claim: `{prefix}:claim:{session}` is set (NX, with the same TTL, renewed by the heartbeat) for the
  length of a turn, so one request at a time per session holds across replicas too (409 otherwise).
  A dead replica's claims expire with its lease, so its sessions are free again within one TTL.
- Which replica holds a session's KV is the session record's `replica` field. A turn arriving
  elsewhere *migrates* the session: that replica rebuilds the KV from Redis (sinks + tail) and becomes
  the holder; the old holder sees the record moved on and drops its stale copy on its next turn.
  Migration is the same mechanism whether the old holder is alive (requests routed elsewhere) or gone
  (its lease expired: a takeover); the lease tells the two apart for the logs and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Delete the claim only if it is still ours (it may have expired and been taken by another replica).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Replicas:
    def __init__(
        self, redis: Any, replica_id: str, *, prefix: str = "streamllm", lease_ms: int = 15_000
    ) -> None:
        self.redis, self.replica_id, self.prefix, self.lease_ms = redis, replica_id, prefix, lease_ms
        self._claims: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.migrations = 0
        """Sessions taken from a replica whose lease was alive."""
        self.takeovers = 0
        """Sessions taken from a replica whose lease had expired."""
        self.on_move: Callable[[str], None] | None = None
        """Called with 'migration' or 'takeover' (metrics)."""

    def lease_key(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}"

    def claim_key(self, session_id: str) -> str:
        return f"{self.prefix}:claim:{session_id}"

    async def start(self) -> None:
        await self._renew()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for session_id in list(self._claims):
            await self.release(session_id)
        with contextlib.suppress(Exception):
            await self.redis.delete(self.lease_key(self.replica_id))

    async def _renew(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.lease_key(self.replica_id), "1", px=self.lease_ms)
        for session_id in self._claims:
            pipe.pexpire(self.claim_key(session_id), self.lease_ms)
        await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self._renew()
            except Exception:  # Redis away for a moment: the next beat tries again
                log.warning("replica %s could not renew its lease", self.replica_id, exc_info=True)

    async def alive(self, replica_id: str) -> bool:
        if replica_id == self.replica_id:
            return True
        return bool(await self.redis.exists(self.lease_key(replica_id)))

    async def claim(self, session_id: str) -> bool:
        """Take the session for one turn; False if another turn (on any replica) holds it."""
        token = f"{self.replica_id}:{uuid.uuid4().hex}"
        if not await self.redis.set(self.claim_key(session_id), token, nx=True, px=self.lease_ms):
            return False
        self._claims[session_id] = token
        return True

    async def release(self, session_id: str) -> None:
        token = self._claims.pop(session_id, None)
        if token is not None:
            with contextlib.suppress(Exception):
                await self.redis.eval(_RELEASE, 1, self.claim_key(session_id), token)

    async def note_move(self, session_id: str, holder: str) -> None:
        """A turn here continues a session last held by `holder`: count a migration or a takeover."""
        if await self.alive(holder):
            kind = "migration"
            self.migrations += 1
        else:
            kind = "takeover"
            self.takeovers += 1
        log.info("session %s: %s from replica %s to %s", session_id, kind, holder, self.replica_id)
        if self.on_move is not None:
            self.on_move(kind)
