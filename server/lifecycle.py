"""Startup, readiness and graceful shutdown of one app.

Startup runs in the background so that the port answers at once: /health and /v1 say 503 until the model
is loaded, Redis is connected and the engine loop runs. Shutdown first refuses new requests (503), gives
in-flight turns `shutdown_grace_seconds` to finish, aborts the rest (their streams end with an error
event), waits for every turn to be committed or abandoned, then stops the engine and Redis.

Once ready, the state is "degraded" while Redis does not answer (`check_redis`, which /health calls):
requests that need Redis get 503 + Retry-After meanwhile, and the server is "ready" again as soon as it
answers; nothing is restarted, the Redis client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streaming_core.engine_api import EngineAPI
from streaming_core.engine_process import EngineProcess
from streaming_core.loader import build_engine, default_data_dir

from .conversation.identity import model_identity
from .conversation.manager import ConversationManager, default_replica_id
from .conversation.replicas import Replicas
from .conversation.store import SessionStore, owner_id
from .logprobs import TokenText
from .metrics import Metrics
from .redis_client import UNAVAILABLE, connect
from .redis_embedded import EmbeddedRedis
from .serving import Serving, served_model_name
from .settings import Settings

log = logging.getLogger(__name__)


def kv_tier_dir(settings: Settings) -> Path:
    """The disk KV tier's directory: per replica, since each wipes its own at start."""
    replica = re.sub(r"[^A-Za-z0-9._-]", "_", default_replica_id())
    return (settings.data_dir or default_data_dir()) / "kv-tier" / replica


async def in_passing_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a thread of its own that ends with it. Loading a model runs OpenMP regions (the
    kernel tuner, the weight packing), and libgomp keeps a pool of worker threads for each thread that ever
    ran one, for as long as that thread lives. An executor thread that loaded the model would keep its pool,
    and with more pooled threads than CPUs libgomp stops spinning between regions: every parallel region of
    the engine thread then waits for a futex wake-up (measured on the 2-core VM: 100 small torch ops 1.1 ms
    from a lone pool, 2.5-3.1 ms beside an idle one; 30 one-row int4 layers 4.7 -> 6.0-7.0 ms)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting task, as asyncio.to_thread would
            result, error = None, e
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="streamllm-load", daemon=True).start()
    return await done


class Lifecycle:
    """The app's state machine: starting -> ready -> draining -> stopped (or failed at startup)."""

    def __init__(self, settings: Settings, engine: EngineAPI | None = None) -> None:
        self.settings = settings
        self._given_engine = engine
        self.owners = frozenset(owner_id(k) for k in settings.api_key_list())
        """sha256 of each accepted API key: the owner ids sessions are filed under."""
        self.serving: Serving | None = None
        self.failed: str | None = None
        self.draining = False
        self.stopped = False
        self.redis_ok = True
        """False from a Redis failure (a request, a commit, the heartbeat) until /health finds it answering."""
        self._startup: asyncio.Task[None] | None = None
        self._redis: Any = None
        self._embedded: EmbeddedRedis | None = None
        self._replicas: Replicas | None = None

    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        if self.failed:
            return "failed"
        if self.draining:
            return "draining"
        if self.serving is None:
            return "starting"
        return "ready" if self.redis_ok else "degraded"

    def start(self) -> None:
        self._startup = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        try:
            settings = self.settings
            engine: EngineAPI | None = self._given_engine
            if engine is None and settings.server.engine_process:
                child = EngineProcess(build_engine, settings.engine, settings.data_dir, kv_tier_dir(settings))
                engine = await asyncio.to_thread(child.launch, asyncio.get_running_loop())
            elif engine is None:
                engine = await in_passing_thread(
                    build_engine, settings.engine, settings.data_dir, kv_tier_dir(settings)
                )
            redis = await self._connect_redis()
            name = served_model_name(settings)
            store = SessionStore(redis, ttl_seconds=settings.server.session_ttl_seconds)
            lease_ms = int(settings.server.replica_lease_seconds * 1000)
            self._replicas = Replicas(
                redis, default_replica_id(), lease_ms=lease_ms, heartbeat_redis=redis.unbounded()
            )
            manager = ConversationManager(
                engine,
                engine.tokenizer,
                store,
                model_name=name,
                pin_system_prompt=settings.server.pin_system_prompt,
                replica_id=self._replicas.replica_id,
                replicas=self._replicas,
                identity=model_identity(name, engine.tokenizer, engine.config.cache),
                # The server gives up on a commit no sooner than every attempt has waited its socket
                # timeout (a dead Redis cannot land a command late): a deadline of one timeout refused
                # commits that a busy event loop merely sent late (the soak saw them as claim losses).
                commit_timeout=settings.redis.command_deadline_seconds,
            )
            metrics = Metrics(name)
            self._replicas.on_move = lambda kind: metrics.moves.labels(name, kind).inc()
            self._replicas.on_error = lambda e: self.redis_failed("heartbeat", e)
            await self._replicas.start()
            engine.on_step = metrics.on_step
            engine.start()
            self.serving = Serving(
                settings,
                engine,
                manager,
                metrics,
                name,
                TokenText(engine.tokenizer),
                redis_failed=self.redis_failed,
                retry_after=settings.redis.retry_after_seconds,
            )
            log.info("ready: serving %s", name)
        except Exception as e:
            log.exception("startup failed")
            self.failed = f"{type(e).__name__}: {e}"

    async def _connect_redis(self) -> Any:
        url = self.settings.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(self.settings.data_dir)
            url = await asyncio.to_thread(self._embedded.start)
        assert url is not None
        self._redis = connect(url, self.settings.redis)
        await self._redis.ping()
        return self._redis

    def redis_failed(self, where: str, e: BaseException) -> None:
        """Redis did not answer somewhere ('request', 'commit', 'heartbeat', 'health'): count it, degrade."""
        if self.redis_ok:
            log.warning("Redis unavailable (%s: %s): degraded until it answers", type(e).__name__, e)
        self.redis_ok = False
        if self.serving is not None:
            self.serving.metrics.redis_errors.labels(self.serving.model_name, where).inc()

    async def check_redis(self) -> bool:
        """PING Redis (bounded by the client's timeouts); updates and returns whether it answered."""
        try:
            await self._redis.ping()
        except UNAVAILABLE as e:
            self.redis_failed("health", e)
            return False
        if not self.redis_ok:
            log.info("Redis answers again")
        self.redis_ok = True
        return True

    def begin_drain(self) -> None:
        """Refuse new requests from now on (idempotent)."""
        self.draining = True

    async def drain(self) -> None:
        """Let in-flight turns finish within the grace period, then abort them and wait for their settlement."""
        self.begin_drain()
        serving = self.serving
        if serving is None:
            return
        grace = self.settings.server.shutdown_grace_seconds
        await _wait_until(lambda: not serving.inflight, grace)
        for turn in list(serving.inflight):
            turn.interrupt(shutdown=True)
        await _wait_until(lambda: not serving.inflight and not serving.cleanups, 30.0)
        if serving.cleanups:
            await asyncio.gather(*serving.cleanups, return_exceptions=True)

    async def stop(self) -> None:
        """Drain, then stop the engine loop and Redis (lifespan shutdown)."""
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        await self.drain()
        engine = self.serving.engine if self.serving else self._given_engine
        if engine is not None:
            await asyncio.to_thread(engine.stop)
            if self._given_engine is None:  # its sessions end with it, and so do their disk KV files
                await asyncio.to_thread(engine.close)
        if self._replicas is not None:
            await self._replicas.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        self.stopped = True
        log.info("stopped")


async def _wait_until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
