"""What a caller of the engine may use, whether the engine runs in this process (`engine.Engine`) or in a
process of its own (`engine_process.EngineProcess`): the server is written against this and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from .config import EngineConfig
from .engine import Handle, StepStats
from .kv_tiers import TierCounts
from .sampler import SamplingParams
from .session import Rebuild, SessionStats


class EngineAPI(Protocol):
    config: EngineConfig
    tokenizer: Any
    eos: set[int]
    on_step: Callable[[StepStats], None] | None

    @property
    def running(self) -> bool: ...

    @property
    def available(self) -> bool: ...

    def submit(
        self,
        session_id: str | None,
        tokens: list[int],
        params: SamplingParams | None,
        loop: asyncio.AbstractEventLoop | None = None,
        rebuild: Rebuild | None = None,
        sink_tokens: int | None = None,
    ) -> Handle: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self, session_id: str) -> SessionStats | None: ...

    def session_state(self, session_id: str) -> Rebuild | None: ...

    def close_session(self, session_id: str) -> bool: ...

    def truncate(self, session_id: str, n: int) -> bool: ...

    def read_tier_counts(self) -> Future[TierCounts]: ...

    def holds(self, session_ids: list[str]) -> Future[dict[str, bool]]: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def close(self) -> None: ...
