"""The server's one Redis client, and what Redis being away means for a request.

Every command is bounded twice. Each attempt waits at most `socket_timeout_seconds` for a reply and
`connect_timeout_seconds` for a connection, and a connection error or timeout is retried `retries` times
with jittered exponential backoff (redis-py's Retry). On top of that the whole command, reconnects
included, ends after `RedisLimits.command_deadline_seconds` (a connect and a reply timeout per attempt): against a frozen Redis the kernel still
accepts connections, so without that bound every retry paid a fresh connection and its handshake as well
as its reply timeout, and requests arriving well into a freeze waited for Redis to come back instead of
being refused. Pooled connections idle for `health_check_interval_seconds` are PINGed before use, so those
a Redis restart broke are replaced rather than failing a request. A request that meets an unavailable
Redis is answered 503 with Retry-After (errors.redis_unavailable).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import TimeoutError as RedisTimeout

from .conversation.replicas import UNAVAILABLE
from .settings import RedisLimits

__all__ = ["UNAVAILABLE", "BoundedRedis", "connect"]
# UNAVAILABLE includes BusyLoadingError (a ConnectionError): a restarted Redis replaying its AOF.
T = TypeVar("T")


async def _bounded(work: Awaitable[T], deadline_s: float, what: str) -> T:
    try:
        async with asyncio.timeout(deadline_s):
            return await work
    except TimeoutError as e:  # the builtin one asyncio raises: make it the Redis error callers handle
        raise RedisTimeout(f"{what}: no answer from Redis within {deadline_s:g}s") from e


class BoundedRedis(Redis):
    """A client whose every command ends within `deadline_s`, whatever its retries do. Pipelines (listing
    and deleting sessions, off the turn's path) keep redis-py's own per-attempt bounds."""

    deadline_s: float = 0.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await _bounded(super().execute_command(*args, **options), self.deadline_s, str(args[0]))

    def unbounded(self) -> Redis:
        """A client on the same connections with only the per-attempt bounds: for the lease heartbeat,
        which must keep retrying through a moment its event loop is starved (a neighbour starting up on
        the same cores) rather than let the lease lapse, and which answers no request meanwhile."""
        return Redis(connection_pool=self.connection_pool)


def connect(url: str, limits: RedisLimits) -> BoundedRedis:
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), limits.retries)
    client = cast(
        BoundedRedis,
        BoundedRedis.from_url(
            url,
            socket_timeout=limits.socket_timeout_seconds,
            socket_connect_timeout=limits.connect_timeout_seconds,
            retry=retry,
            retry_on_error=list(UNAVAILABLE),
            health_check_interval=limits.health_check_interval_seconds,
        ),
    )
    client.deadline_s = limits.command_deadline_seconds
    return client
