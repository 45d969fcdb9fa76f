"""The engine side of a conversation's session: whether the engine's KV still matches what Redis committed,
and dropping it when it does not. Every engine call runs in a thread (they wait on the engine loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from streaming_core.engine_api import EngineAPI

from .plan import TurnPlan

log = logging.getLogger(__name__)
_CLOSE_WAIT_S = 5.0


async def untouched(engine: EngineAPI, plan: TurnPlan) -> bool:
    """The engine still holds the session exactly as committed (the turn was refused before it
    consumed anything, e.g. queue_full): keep it rather than force a rebuild."""
    assert plan.session_id is not None
    record = plan.turn.record if plan.turn else None
    if record is None or plan.rebuild is not None or plan.mode == "rebuilt":
        return False
    stats = await asyncio.to_thread(engine.stats, plan.session_id)
    return stats is not None and not stats.busy and stats.tokens_seen == record.tokens_seen


async def close(engine: EngineAPI, session_id: str, request_id: str | None) -> None:
    """Close the engine session once its request (aborted here if still running) has ended."""
    deadline = asyncio.get_running_loop().time() + _CLOSE_WAIT_S
    while not await asyncio.to_thread(engine.close_session, session_id):
        stats = await asyncio.to_thread(engine.stats, session_id)
        if stats is None:
            return
        if asyncio.get_running_loop().time() > deadline:
            log.warning("session %s still busy: its KV was not dropped", session_id)
            return
        if request_id is not None:
            engine.abort(request_id)
        await asyncio.sleep(0.02)


async def drop_last(engine: EngineAPI, session_id: str, n: int) -> None:
    """Drop the KV's last n tokens: cheaply if the engine can truncate, else by closing the session
    (the next turn rebuilds it from the trimmed record)."""
    truncate = getattr(engine, "truncate", None)
    if truncate is not None and await asyncio.to_thread(truncate, session_id, n):
        return
    await asyncio.to_thread(engine.close_session, session_id)


async def resident(engine: EngineAPI, session_ids: Sequence[str]) -> dict[str, bool]:
    """Which of the sessions the engine holds (False for all if its loop cannot answer)."""
    future = engine.holds(list(session_ids))
    with contextlib.suppress(Exception):
        return await asyncio.wrap_future(future)
    return dict.fromkeys(session_ids, False)
