"""What requests use once the server is ready: the engine, the conversation manager, metrics, names."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from streaming_core.engine_api import EngineAPI
from streaming_core.loader import DEFAULT_GGUF

from .conversation.manager import ConversationManager
from .logprobs import TokenText
from .metrics import Metrics
from .settings import Settings


class InFlight(Protocol):
    """A submitted turn, as shutdown sees it (turn.Turn)."""

    def interrupt(self, shutdown: bool = False) -> None: ...


def served_model_name(settings: Settings) -> str:
    """The model id clients use: the configured one, else the loaded model's name."""
    if settings.model_name:
        return settings.model_name
    source = settings.engine.model
    if source == "default":
        return DEFAULT_GGUF.split(".")[0]
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


@dataclass
class Serving:
    """What requests use once the server is ready."""

    settings: Settings
    engine: EngineAPI
    manager: ConversationManager
    metrics: Metrics
    model_name: str
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: set[InFlight] = field(default_factory=set)
    """Turns submitted and not yet committed or abandoned."""
    cleanups: set[asyncio.Task[None]] = field(default_factory=set)
    """Background settlements of turns whose client went away."""
    redis_failed: Callable[[str, BaseException], None] = lambda where, e: None
    """Report Redis unavailable ('commit', ...): counted in /metrics, /health degraded (Lifecycle)."""
    retry_after: int = 2
    """Retry-After seconds of 503s while Redis is unavailable."""

    @cached_property
    def fingerprint(self) -> str:
        """system_fingerprint: changes when the model or the engine configuration does."""
        key = f"{self.model_name}|{self.settings.engine}"
        return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]

    @property
    def eos(self) -> set[int]:
        return self.engine.eos

    def session_id_ok(self, session_id: str) -> bool:
        return re.fullmatch(self.settings.server.session_id_pattern, session_id) is not None

    def background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a settlement coroutine that must outlive the request that started it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)
        return task
