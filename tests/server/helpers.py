"""Driving turns through a ConversationManager and the engine, as the HTTP layer does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from server.conversation.manager import ConversationManager, TurnPlan
from server.redis_embedded import EmbeddedRedis
from streaming_core.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16)


@contextlib.contextmanager
def freezable_redis(data_dir: Any, **options: Any) -> Iterator[EmbeddedRedis]:
    """A started embedded Redis that a test may SIGSTOP: it is thawed before being stopped."""
    server = EmbeddedRedis(data_dir, **options)
    server.start()
    try:
        yield server
    finally:
        if server.pid:
            os.kill(server.pid, signal.SIGCONT)
        server.stop(force=True)


@dataclass
class Reply:
    tokens: list[int]
    text: str
    finish: str


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


async def generate(
    manager: ConversationManager, plan: TurnPlan, params: SamplingParams = GREEDY, commit: bool = True
) -> Reply:
    """Submit a plan, collect its events, and (by default) commit the turn."""
    handle = manager.submit(plan, params, asyncio.get_running_loop())
    tokens, text, finish = [], "", ""
    async for event in handle.stream:
        if event.token is not None:
            tokens.append(event.token)
        text += event.text
        finish = event.finish_reason or ""
    if commit:
        await manager.commit(plan, text, finish)
    return Reply(tokens, text, finish)


async def chat(
    manager: ConversationManager, owner: str, sid: str | None, messages: list[dict[str, str]], **kw: object
) -> tuple[TurnPlan, Reply]:
    plan = await manager.plan_chat(owner, sid, messages, **kw)  # type: ignore[arg-type]
    return plan, await generate(manager, plan)
