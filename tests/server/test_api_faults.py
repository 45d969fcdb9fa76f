"""Engine faults seen over real HTTP: a failed engine step, a client that leaves during a long prefill."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaming_core.batch import BatchPlan
from streaming_core.loader import LoadedModel

from .conftest_http import MODEL, LiveServer, make_engine, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def live(tmp_path: Path, default_model: LoadedModel) -> Iterator[LiveServer]:
    server = LiveServer(make_settings(tmp_path), make_engine(default_model, num_slots=2))
    yield server
    server.stop()


def chat(live: LiveServer, messages: list[dict[str, str]], sid: str | None, **kw: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0} | kw
    body |= {"session_id": sid} if sid else {}
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)


def reply(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_failed_step_is_an_error_and_the_next_turn_is_rebuilt(live: LiveServer) -> None:
    """A step that fails after writing KV ends the turn with a 500; the session's engine KV (holding the
    failed turn's tokens) is not reused: the next turn is rebuilt from Redis and equals the stateless reply."""
    sid = f"fault-{uuid.uuid4().hex[:8]}"
    first = [{"role": "user", "content": "Name three colours."}]
    history = [*first, {"role": "assistant", "content": reply(chat(live, first, sid))}]
    engine = live.engine
    run, armed = engine.runner.run, [True]

    def flaky(plan: BatchPlan) -> Any:
        out = run(plan)  # the KV of the step is written, then the step fails (e.g. in sampling)
        if armed[0] and plan.chunks:
            armed[0] = False
            raise RuntimeError("injected step failure")
        return out

    engine.runner.run = flaky  # type: ignore[method-assign]
    long = "Now describe, in great detail and at length, a harbour at dawn with its boats, gulls and nets."
    failed = chat(live, [*history, {"role": "user", "content": long}], sid)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert not armed[0]
    assert engine.stats(sid) is None  # the engine forgot the session rather than keep its KV

    follow = [*history, {"role": "user", "content": "Thanks!"}]
    again = chat(live, follow, sid)
    assert reply(again) == reply(chat(live, follow, None))
    info = httpx.get(f"{live.url}/v1/sessions/{sid}").json()
    assert info["turns"] == 2 and info["rebuilds"] == 1


def test_disconnect_during_a_long_prefill_aborts_it(live: LiveServer) -> None:
    """A client that goes away before its first token (a long prompt still prefilling) aborts the request
    within a step or two, not when the prefill ends."""
    sid = f"gone-{uuid.uuid4().hex[:8]}"
    text = "The lighthouse keeper counted the waves, one by one, until the night was over. " * 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    body |= {"stream": True, "temperature": 0, "session_id": sid}
    payload = json.dumps(body).encode()
    engine = live.engine
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    prompt_chunks = -(-len(engine.tokenizer.encode(text)) // engine.config.cache.prefill_chunk)
    assert prompt_chunks >= 8  # the prefill takes many steps
    with socket.create_connection(("127.0.0.1", live.port)) as conn:
        conn.sendall(head + payload)
        deadline = time.monotonic() + 60
        while (s := engine.stats(sid)) is None or s.tokens_seen == 0:  # the first chunk is in
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
        closed_at = engine.steps
    deadline = time.monotonic() + 10
    while (s := engine.stats(sid)) is not None and s.busy:
        assert time.monotonic() < deadline, "the prefill went on after the client left"
        time.sleep(0.005)
    assert engine.steps - closed_at <= 3, "the engine kept prefilling for a gone client"
    assert engine.steps - closed_at < prompt_chunks - 2
    assert not engine.scheduler.running and not engine.scheduler.waiting
