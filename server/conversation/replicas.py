"""Several replicas on one Redis: each holds a renewed lease, and a session is claimed by one replica per turn.

- Lease: `{prefix}:replica:{id}` holds the id of the replica's live process while it lives; a heartbeat
  renews it every third of its TTL. A SIGKILL'd replica's lease simply expires, or is overwritten by
  the replica's next process.
- Claim: `{prefix}:claim:{session}` is set (with the same TTL, renewed by the heartbeat) for the length
  of a turn, so one request at a time per session holds across replicas too (409 otherwise). A claim is
  valid only while its process holds its replica's lease: a dead replica's sessions are free again
  within one TTL, and at once when that replica restarts (a SIGKILL mid-stream leaves nothing busy).
- Fencing: a claim's value is a token only its turn knows. Renewal extends a claim only while it still
  holds that token, and the turn's commit (store.put with the `Fence`) is a compare-and-set on it, so a
  replica whose claim expired (paused, cut off from Redis) can neither extend it nor commit over the
  replica that took the session since. The fence also carries a deadline in Redis's clock: a commit that
  reaches Redis after its sender gave up on it (it sat in a frozen Redis's socket) is refused, so a turn
  reported failed never lands later.
- A release (or a claim) that fails while Redis is away may still land when Redis reads its socket
  again; either way the heartbeat releases that token later, and this replica's next claim of the
  session replaces its own stale claim at once: a session is never left busy by a Redis outage.
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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError, TimeoutError

log = logging.getLogger(__name__)
UNAVAILABLE = (ConnectionError, TimeoutError)
"""redis-py's errors for a Redis that cannot be reached or does not answer in time."""

# Delete the claim only if it is still ours (it may have expired and been taken by another replica).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Take the claim if it is free, if it is our own stale one (ARGV[3], a release that failed), or if its
# holder's process no longer holds its replica's lease (ARGV[4] is the lease key prefix): the holder died
# and restarted, or was cut off longer than its lease. Answers Redis's clock, or false.
_CLAIM = """
local cur = redis.call('get', KEYS[1])
if cur and cur ~= ARGV[3] then
  local replica, process = string.match(cur, '^(.*)|(%x+)|%x+$')
  if not replica or redis.call('get', ARGV[4] .. replica) == process then return false end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('time')
"""
# Renew the lease (KEYS[1]) and each claim (KEYS[i + 1]) still holding its token (ARGV[i + 1]); answer the
# indexes of claims lost to expiry.
_RENEW = """
redis.call('set', KEYS[1], ARGV[#ARGV], 'PX', ARGV[1])
local lost = {}
for i = 2, #KEYS do
  if redis.call('get', KEYS[i]) == ARGV[i] then redis.call('pexpire', KEYS[i], ARGV[1])
  else table.insert(lost, i - 1) end
end
return lost
"""


@dataclass(frozen=True)
class Fence:
    """What a commit must prove: the claim key still holds `token`, and Redis's clock is before `deadline_ms`."""

    key: str
    token: str
    deadline_ms: int


@dataclass
class _Claim:
    token: str
    offset_s: float
    """Redis's clock minus ours, measured when the claim was taken."""


class Replicas:
    def __init__(
        self,
        redis: Any,
        replica_id: str,
        *,
        prefix: str = "streamllm",
        lease_ms: int = 15_000,
        heartbeat_redis: Any = None,
    ) -> None:
        """`heartbeat_redis`: the client the lease renewal uses (default `redis`); requests' claims and
        releases use `redis`, whose commands the server bounds in all (server/redis_client.py)."""
        self.redis, self.replica_id, self.prefix, self.lease_ms = redis, replica_id, prefix, lease_ms
        self.heartbeat_redis = heartbeat_redis if heartbeat_redis is not None else redis
        self.process = uuid.uuid4().hex
        """This process's id in the lease and in its claims' tokens (`replica|process|nonce`)."""
        self._claims: dict[str, _Claim] = {}
        self._stale: dict[str, str] = {}
        """Claims whose release failed (Redis away): session -> token, released by the heartbeat."""
        self._task: asyncio.Task[None] | None = None
        self.migrations = 0
        """Sessions taken from a replica whose lease was alive."""
        self.takeovers = 0
        """Sessions taken from a replica whose lease had expired."""
        self.on_move: Callable[[str], None] | None = None
        """Called with 'migration' or 'takeover' (metrics)."""
        self.on_error: Callable[[Exception], None] | None = None
        """Called when the heartbeat cannot reach Redis (metrics, health)."""

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

    async def _renew(self) -> list[str]:
        """Renew the lease and the claims still ours; returns the sessions whose claim was lost."""
        sessions = list(self._claims)
        keys = [self.lease_key(self.replica_id), *map(self.claim_key, sessions)]
        tokens = [self._claims[sid].token for sid in sessions]
        lost = [
            sessions[i - 1]
            for i in await self.heartbeat_redis.eval(
                _RENEW, len(keys), *keys, self.lease_ms, *tokens, self.process
            )
        ]
        for sid in lost:
            log.warning("session %s: this replica's claim expired and was not renewed", sid)
        for sid, token in list(self._stale.items()):
            await self.heartbeat_redis.eval(_RELEASE, 1, self.claim_key(sid), token)
            if self._stale.get(sid) == token:  # a claim during the await may have replaced or dropped it
                del self._stale[sid]
        return lost

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self._renew()
            except UNAVAILABLE as e:  # Redis away for a moment: the next beat tries again
                log.warning("replica %s could not renew its lease: %s", self.replica_id, e)
                if self.on_error is not None:
                    self.on_error(e)
            except Exception:  # a dead heartbeat would let every claim of this replica expire
                log.exception("replica %s: lease renewal failed", self.replica_id)

    async def alive(self, replica_id: str) -> bool:
        if replica_id == self.replica_id:
            return True
        return bool(await self.redis.exists(self.lease_key(replica_id)))

    async def claim(self, session_id: str) -> bool:
        """Take the session for one turn; False if another turn (on any replica) holds it."""
        token = f"{self.replica_id}|{self.process}|{uuid.uuid4().hex}"
        stale = self._stale.get(session_id, "")
        sent = time.time()
        lease_prefix = self.lease_key("")
        try:
            now = await self.redis.eval(
                _CLAIM, 1, self.claim_key(session_id), token, self.lease_ms, stale, lease_prefix
            )
        except UNAVAILABLE:
            # The claim may still land when a frozen Redis reads its socket: treat it as ours and stale.
            self._stale[session_id] = token
            raise
        if not now:
            return False
        self._stale.pop(session_id, None)
        redis_time = int(now[0]) + int(now[1]) / 1e6
        self._claims[session_id] = _Claim(token, redis_time - (sent + time.time()) / 2)
        return True

    def fence(self, session_id: str, timeout_s: float) -> Fence | None:
        """The fence of this replica's claim on the session for a commit sent now that its sender waits
        `timeout_s` for; None if this replica holds no claim on it."""
        claim = self._claims.get(session_id)
        if claim is None:
            return None
        deadline = time.time() + claim.offset_s + timeout_s
        return Fence(self.claim_key(session_id), claim.token, int(deadline * 1000))

    async def release(self, session_id: str, later: bool = False) -> None:
        """Give the claim back; if Redis is away (or `later`), the heartbeat or the next claim here does it."""
        claim = self._claims.pop(session_id, None)
        if claim is None:
            return
        if later:
            self._stale[session_id] = claim.token
            return
        try:
            await self.redis.eval(_RELEASE, 1, self.claim_key(session_id), claim.token)
        except UNAVAILABLE as e:
            self._stale[session_id] = claim.token
            if self.on_error is not None:
                self.on_error(e)

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
