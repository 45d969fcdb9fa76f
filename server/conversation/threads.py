"""Threads in Redis: the stored side of the Responses and Conversations APIs, next to the session records.

A thread is a conversation (Conversations API, kind "conversation") or a chain of stored responses
(previous_response_id, kind "chain"). It owns a capped list of items (messages, as OpenAI's item objects),
a capped list of its response ids, and points at the chat session that holds its KV.

Keys, all expiring `ttl_seconds` after the thread's last write (the sessions' TTL):
- `{prefix}:thread:{id}`: the Thread as JSON;
- `{prefix}:items:{id}`: the items, oldest first, at most `max_items` (older ones are dropped);
- `{prefix}:responses:{id}`: the thread's response ids, at most `max_items` (the oldest responses are deleted);
- `{prefix}:response:{id}`: a StoredResponse as JSON (the response object, its input items, its thread).

Every change is one Lua script guarded by the thread's `version`: a writer that read version v writes only
if the thread is still at v, so two requests racing on one thread (even on two replicas) never interleave
their items; the loser gets a conflict and retries.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConversationError

Item = dict[str, Any]

DEFAULT_MAX_ITEMS = 1000

# KEYS: thread, items, responses, response ('' name when none). ARGV: expected version ('' = must not exist),
# ttl, cap, response-key prefix, thread JSON, response id ('' = none), response JSON, then items to append.
# Answers 1 (written) or 0 (the thread changed or vanished since it was read).
_WRITE = """
local cur = redis.call('get', KEYS[1])
if ARGV[1] == '' then
  if cur then return 0 end
else
  if not cur or tostring(cjson.decode(cur)['version']) ~= ARGV[1] then return 0 end
end
local ttl, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('set', KEYS[1], ARGV[5], 'EX', ttl)
if #ARGV >= 8 then
  redis.call('rpush', KEYS[2], unpack(ARGV, 8))
  local extra = redis.call('llen', KEYS[2]) - cap
  if extra > 0 then redis.call('ltrim', KEYS[2], extra, -1) end
end
if redis.call('exists', KEYS[2]) == 1 then redis.call('expire', KEYS[2], ttl) end
if ARGV[6] ~= '' then
  redis.call('set', KEYS[4], ARGV[7], 'EX', ttl)
  redis.call('rpush', KEYS[3], ARGV[6])
  while redis.call('llen', KEYS[3]) > cap do
    redis.call('del', ARGV[4] .. redis.call('lpop', KEYS[3]))
  end
end
if redis.call('exists', KEYS[3]) == 1 then redis.call('expire', KEYS[3], ttl) end
return 1
"""

# KEYS: thread, items. ARGV: expected version, ttl, thread JSON, the item's exact JSON. Answers 1 or 0.
_REMOVE_ITEM = """
local cur = redis.call('get', KEYS[1])
if not cur or tostring(cjson.decode(cur)['version']) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[3], 'EX', tonumber(ARGV[2]))
return redis.call('lrem', KEYS[2], 1, ARGV[4]) > 0 and 1 or 0
"""

# KEYS: thread, items, responses. ARGV: response-key prefix. Deletes the thread and all its responses.
_DELETE = """
for _, rid in ipairs(redis.call('lrange', KEYS[3], 0, -1)) do redis.call('del', ARGV[1] .. rid) end
return redis.call('del', KEYS[1], KEYS[2], KEYS[3])
"""


def thread_conflict(thread_id: str) -> ConversationError:
    return ConversationError(
        409,
        f"conversation {thread_id!r} changed while this request ran (another request on it); retry",
        type="conflict_error",
        param="conversation",
        code="conversation_conflict",
    )


@dataclass
class Thread:
    """A conversation or a response chain: its items live in their own list, its KV in a chat session."""

    id: str
    owner: str
    kind: str = "chain"
    """'conversation' (created by POST /v1/conversations) or 'chain' (by a stored response)."""
    session: str = ""
    """The chat session holding the KV of the thread's items up to `committed` ('' = none yet)."""
    turns: int = 0
    """That session's turn count when the thread's last response was committed: if the session record says
    otherwise (a turn committed whose response was not stored), the session is not continued."""
    committed: str = ""
    """Id of the last item the session holds; the items after it are pending (added without a response)."""
    head: str = ""
    """The thread's latest response: chaining to it continues the session, to any other one forks."""
    instructions: str | None = None
    """The system message the session was opened with."""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int = field(default_factory=lambda: int(time.time()))
    version: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str) -> Thread:
        return cls(**json.loads(data))


@dataclass
class StoredResponse:
    """A stored response: the object GET returns, what it was generated from, and where it lives."""

    id: str
    owner: str
    thread: str
    body: dict[str, Any]
    """The Response object as returned when it completed."""
    input: list[Item]
    """Its own input items (input_items lists them)."""
    output: list[Item]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str) -> StoredResponse:
        return cls(**json.loads(data))


def item_json(item: Item) -> str:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


class ThreadStore:
    """Threads, their items and their responses over redis-py's asyncio client."""

    def __init__(
        self,
        redis: Any,
        *,
        ttl_seconds: int,
        max_items: int = DEFAULT_MAX_ITEMS,
        prefix: str = "streamllm",
    ) -> None:
        if max_items < 2:
            raise ValueError(f"max_items must be >= 2, got {max_items}")
        self.redis, self.ttl_seconds, self.max_items, self.prefix = redis, ttl_seconds, max_items, prefix

    def _keys(self, thread_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}:thread:{thread_id}", f"{p}:items:{thread_id}", f"{p}:responses:{thread_id}"]

    def _response_key(self, response_id: str) -> str:
        return f"{self.prefix}:response:{response_id}"

    async def get(self, owner: str, thread_id: str) -> Thread | None:
        """The thread, if it exists and belongs to `owner` (another owner's thread is None, as missing)."""
        data = await self.redis.get(self._keys(thread_id)[0])
        thread = Thread.from_json(data) if data else None
        return thread if thread is not None and thread.owner == owner else None

    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        data = await self.redis.get(self._response_key(response_id))
        stored = StoredResponse.from_json(data) if data else None
        return stored if stored is not None and stored.owner == owner else None

    async def items(self, thread_id: str) -> list[Item]:
        """The thread's items, oldest first (at most max_items)."""
        return [json.loads(x) for x in await self.redis.lrange(self._keys(thread_id)[1], 0, -1)]

    async def write(
        self,
        thread: Thread,
        items: list[Item] | None = None,
        response: StoredResponse | None = None,
        *,
        new: bool = False,
    ) -> bool:
        """Save `thread` one version on (its `version` as read, bumped here), append `items` and store
        `response`; False if the thread changed since it was read (or exists already, `new`)."""
        expected = "" if new else str(thread.version)
        thread.version += 1
        keys = [*self._keys(thread.id), self._response_key(response.id) if response else self._keys("")[0]]
        argv = [
            expected,
            self.ttl_seconds,
            self.max_items,
            self._response_key(""),
            thread.to_json(),
            response.id if response else "",
            response.to_json() if response else "",
            *(item_json(i) for i in items or ()),
        ]
        written = int(await self.redis.eval(_WRITE, len(keys), *keys, *argv)) == 1
        if not written:
            thread.version -= 1
        return written

    async def remove_item(self, thread: Thread, item: Item) -> bool:
        """Remove one item (as read from `items`) and save `thread`; False if either changed meanwhile."""
        expected = str(thread.version)
        thread.version += 1
        keys = self._keys(thread.id)[:2]
        argv = [expected, self.ttl_seconds, thread.to_json(), item_json(item)]
        return int(await self.redis.eval(_REMOVE_ITEM, len(keys), *keys, *argv)) == 1

    async def delete(self, thread_id: str) -> None:
        """The thread, its items and every response stored in it."""
        keys = self._keys(thread_id)
        await self.redis.eval(_DELETE, len(keys), *keys, self._response_key(""))

    async def delete_response(self, stored: StoredResponse) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._response_key(stored.id))
            pipe.lrem(self._keys(stored.thread)[2], 1, stored.id)
            await pipe.execute()
