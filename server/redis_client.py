"""The server's one Redis client, and what Redis being away means for a request.

Every command is bounded: a reply waits at most `socket_timeout_seconds`, a connection
`connect_timeout_seconds`, and a connection error or timeout is retried `retries` times with jittered
exponential backoff (redis-py's Retry), so a frozen or dead Redis fails a request in about
(retries + 1) x timeout instead of hanging it. Pooled connections idle for `health_check_interval_seconds`
are PINGed before use, so those a Redis restart broke are replaced rather than failing a request.
A request that meets an unavailable Redis is answered 503 with Retry-After (errors.redis_unavailable).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .conversation.replicas import UNAVAILABLE
from .settings import RedisLimits

__all__ = ["UNAVAILABLE", "connect"]
# UNAVAILABLE includes BusyLoadingError (a ConnectionError): a restarted Redis replaying its AOF.


def connect(url: str, limits: RedisLimits) -> Redis:
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), limits.retries)
    return Redis.from_url(
        url,
        socket_timeout=limits.socket_timeout_seconds,
        socket_connect_timeout=limits.connect_timeout_seconds,
        retry=retry,
        retry_on_error=list(UNAVAILABLE),
        health_check_interval=limits.health_check_interval_seconds,
    )
