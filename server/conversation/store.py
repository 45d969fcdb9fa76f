"""Session records in Redis: one hash per session, one index set per owner; written once per completed turn.

Keys: `{prefix}:session:{id}` (a hash of the SessionRecord fields) and `{prefix}:owner:{owner}` (the
set of that owner's session ids). Both expire `ttl_seconds` after the session's last turn. A record is
written whole by one Lua script, so a reader never sees half a turn; given a `Fence` (replicas.py) the
script writes only if the turn's claim still holds its token and Redis's clock is before its deadline.

Every field is bounded whatever the conversation's length: counters, three chain values (see chain.py),
a render context of a few capped messages, the last reply, and the sinks and token tail that rebuild the
KV (at most sink_tokens + window token ids, packed as little-endian int32).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from redis.exceptions import TimeoutError

from .replicas import Fence

DEFAULT_TTL_SECONDS = 7 * 86400
ANONYMOUS = "anonymous"
_TOKENS = ("sinks", "tail")
_JSON = ("context",)

# KEYS: session, owner index, claim. ARGV: ttl, session id, token ('' = unfenced), deadline ms, then the
# record's field/value pairs. Answers 1 (written), 0 (the claim is not ours: lost to expiry), -1 (too late).
_PUT = """
if ARGV[3] ~= '' then
  if redis.call('get', KEYS[3]) ~= ARGV[3] then return 0 end
  redis.replicate_commands()
  local now = redis.call('time')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[4]) then return -1 end
end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('expire', KEYS[1], ARGV[1])
redis.call('sadd', KEYS[2], ARGV[2])
redis.call('expire', KEYS[2], ARGV[1])
return 1
"""


def owner_id(api_key: str | None) -> str:
    """Who owns a session: sha256 of the API key (never the key itself), or 'anonymous'."""
    return hashlib.sha256(api_key.strip().encode()).hexdigest() if api_key else ANONYMOUS


def pack_tokens(tokens: list[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i4").astype(int).tolist()


@dataclass
class SessionRecord:
    """Everything a replica needs to continue a session it does not hold, as of its last completed turn."""

    id: str
    owner: str
    kind: str = "chat"
    """'chat' (messages through the chat template) or 'completion' (raw text appended)."""
    model: str = ""
    model_id: str = ""
    """The model identity the tokens belong to (identity.py): name, vocabulary fingerprint, cache shape."""
    replica: str = ""
    """Replica that served the last turn (its engine may still hold the KV)."""
    created_at: float = 0.0
    updated_at: float = 0.0
    turns: int = 0
    rebuilds: int = 0
    """Turns that had to recompute the KV (restart, other replica, edited history, trimmed reply)."""
    tokens_seen: int = 0
    cache_tokens: int = 0
    sink_tokens: int = 0
    """Sinks the session keeps: the configured count, or more when the system prompt is pinned."""
    window: int = 0
    pin_tokens: int = 0
    """Tokens of the rendered system-prompt head that pinning asked to keep (0: nothing to pin)."""
    last_mode: str = ""
    """How the last turn was planned: 'new', 'full', 'delta' or 'rebuilt' (TurnPlan.mode)."""
    last_prompt_tokens: int = 0
    last_cached_tokens: int = 0
    """The last turn's usage.prompt_tokens and its prompt_tokens_details.cached_tokens."""
    chain_len: int = 0
    chain_first: str = ""
    chain_last: str = ""
    context: list[dict[str, str]] = field(default_factory=list)
    """Bounded render context of the last reply: the opening system message and the last exchange."""
    reply: str = ""
    """The last assistant reply, as committed."""
    kv_back: str = ""
    kv_ahead: str = ""
    """Where the KV ends relative to render(context) (templates.KVEnd)."""
    pending: str = ""
    """Completion sessions: text of the last reply the KV does not hold yet, sent before the next prompt."""
    sinks: list[int] = field(default_factory=list)
    tail: list[int] = field(default_factory=list)

    def summary(self, resident: bool) -> dict[str, Any]:
        """What GET /v1/sessions/{id} shows; `resident`: this replica's engine holds the KV now."""
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "turns": self.turns,
            "messages": self.chain_len,
            "tokens_seen": self.tokens_seen,
            "cache_tokens": self.cache_tokens,
            "evicted": self.tokens_seen - self.cache_tokens,
            "sink_tokens": self.sink_tokens,
            "pinned_tokens": self.pin_tokens,
            "window": self.window,
            "last_turn": {
                "mode": self.last_mode,
                "prompt_tokens": self.last_prompt_tokens,
                "cached_tokens": self.last_cached_tokens,
            },
            "rebuilds": self.rebuilds,
            "created_at": int(self.created_at),
            "updated_at": int(self.updated_at),
            "resident": resident,
            "replica": self.replica,
        }

    def to_redis(self) -> dict[str, str | bytes]:
        out: dict[str, str | bytes] = {}
        for name, value in asdict(self).items():
            if name in _TOKENS:
                out[name] = pack_tokens(value)
            elif name in _JSON:
                out[name] = json.dumps(value, ensure_ascii=False)
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_redis(cls, data: dict[bytes, bytes]) -> SessionRecord:
        raw = {k.decode(): v for k, v in data.items()}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            v = raw[f.name]
            if f.name in _TOKENS:
                values[f.name] = unpack_tokens(v)
            elif f.name in _JSON:
                values[f.name] = json.loads(v)
            elif f.type == "int":
                values[f.name] = int(v)
            elif f.type == "float":
                values[f.name] = float(v)
            else:
                values[f.name] = v.decode()
        return cls(**values)


class SessionStore:
    """SessionRecords over redis-py's asyncio client (created with decode_responses=False, the default)."""

    def __init__(
        self, redis: Any, *, ttl_seconds: int = DEFAULT_TTL_SECONDS, prefix: str = "streamllm"
    ) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be >= 1, got {ttl_seconds}")
        self.redis, self.ttl_seconds, self.prefix = redis, ttl_seconds, prefix

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SessionStore:
        from redis.asyncio import Redis

        return cls(Redis.from_url(url), **kwargs)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}"

    async def get(self, session_id: str) -> SessionRecord | None:
        data = await self.redis.hgetall(self.key(session_id))
        return SessionRecord.from_redis(data) if data else None

    async def get_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        if not session_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.hgetall(self.key(sid))
            rows = await pipe.execute()
        return [SessionRecord.from_redis(row) if row else None for row in rows]

    async def put(self, record: SessionRecord, fence: Fence | None = None) -> bool:
        """Replace the record and refresh both TTLs, atomically; False if `fence` shows the claim lost.
        A fenced write that reaches Redis after its deadline is refused and raises TimeoutError, as if it
        had never arrived (its sender has given up on it)."""
        keys = [self.key(record.id), self.owner_key(record.owner), fence.key if fence else self.key("")]
        head = [self.ttl_seconds, record.id, fence.token if fence else "", fence.deadline_ms if fence else 0]
        pairs = [x for item in record.to_redis().items() for x in item]
        written = int(await self.redis.eval(_PUT, len(keys), *keys, *head, *pairs))
        if written < 0:
            raise TimeoutError(f"the commit of session {record.id!r} reached Redis after its deadline")
        return written == 1

    async def delete(self, record: SessionRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(record.id))
            pipe.srem(self.owner_key(record.owner), record.id)
            await pipe.execute()

    async def ids(self, owner: str) -> list[str]:
        return sorted(m.decode() for m in await self.redis.smembers(self.owner_key(owner)))

    async def forget(self, owner: str, session_ids: list[str]) -> None:
        """Drop expired sessions from an owner's index."""
        if session_ids:
            await self.redis.srem(self.owner_key(owner), *session_ids)

    async def ttl(self, session_id: str) -> int:
        """Seconds the record has left (-2: no record)."""
        return int(await self.redis.ttl(self.key(session_id)))
