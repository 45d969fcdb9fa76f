"""Redis faults under a live server (real uvicorn, real embedded Redis, the OpenAI SDK as client): a frozen
(SIGSTOP) or killed Redis gives 503 + Retry-After within a bounded time, in-flight streams end with an
error event, /health says degraded, /metrics counts the errors; once Redis is back the same sessions go
on within seconds, none stays busy, and every committed turn is there."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.redis_embedded import EmbeddedRedis, free_port
from server.settings import ServerLimits, Settings
from streaming_core.loader import LoadedModel

from .conftest_http import MODEL, LiveServer, make_engine
from .helpers import freezable_redis

pytestmark = pytest.mark.slow
BOUND_S = 6.0
"""Most seconds a request may take to be refused while Redis is away (default timeouts: ~2 s)."""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with freezable_redis(tmp_path / "redis-data", port=free_port(), appendfsync="always") as server:
        yield server


@pytest.fixture
def live(tmp_path: Path, default_model: LoadedModel, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, server=ServerLimits())
    server = LiveServer(settings, make_engine(default_model, num_slots=4))
    yield server
    server.stop()


def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)


def ask(live: LiveServer, sid: str, text: str, max_tokens: int = 4) -> str:
    reply = client(live).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"session_id": sid, "session_mode": "delta"},
    )
    return reply.choices[0].message.content or ""


def refused(live: LiveServer, sid: str) -> tuple[openai.APIStatusError, float]:
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        ask(live, sid, "Are you there?")
    return e.value, time.monotonic() - start


def assert_unavailable(err: openai.APIStatusError, elapsed: float) -> None:
    assert err.status_code == 503, err.response.text
    assert int(err.response.headers["retry-after"]) >= 1
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "service_unavailable" and body["code"] == "redis_unavailable"
    assert elapsed < BOUND_S, f"refused after {elapsed:.1f}s"


def recovered(live: LiveServer, sid: str, timeout: float = 5.0) -> float:
    """Seconds until a turn on `sid` succeeds again."""
    start = time.monotonic()
    while True:
        try:
            ask(live, sid, "Still there?")
            return time.monotonic() - start
        except openai.APIStatusError as e:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not recovered after {timeout}s: {e.response.text}") from e
            time.sleep(0.2)


def turns(live: LiveServer, sid: str) -> int:
    return int(httpx.get(f"{live.url}/v1/sessions/{sid}", timeout=10).json()["turns"])


def redis_errors(live: LiveServer) -> dict[str, float]:
    """streamllm:redis_errors_total by its `where` label."""
    out = {}
    for line in httpx.get(f"{live.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("streamllm:redis_errors_total{"):
            where = line.split('where="', 1)[1].split('"', 1)[0]
            out[where] = float(line.rsplit(" ", 1)[1])
    assert out, "no streamllm:redis_errors metric"
    return out


def test_a_frozen_redis_gives_503_then_the_same_sessions_go_on(
    live: LiveServer, redis_server: EmbeddedRedis
) -> None:
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    ask(live, a, "Hello!")
    ask(live, b, "Hi!")
    assert redis_server.pid
    stream = client(live).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"session_id": a, "session_mode": "delta", "ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    os.kill(redis_server.pid, signal.SIGSTOP)  # frozen while the stream runs: its commit cannot land
    try:
        start = time.monotonic()
        with pytest.raises(openai.APIError) as e:
            for _ in chunks:
                pass
        assert "redis" in str(e.value).lower()
        assert time.monotonic() - start < BOUND_S + 10  # the rest of the reply, then a bounded commit
        err, elapsed = refused(live, b)
        print(f"\nfrozen Redis: 503 after {elapsed:.2f}s")
        assert_unavailable(err, elapsed)
        info = httpx.get(f"{live.url}/v1/sessions/{a}", timeout=BOUND_S)
        assert info.status_code == 503 and info.json()["error"]["code"] == "redis_unavailable"
        assert "retry-after" in info.headers
        health = httpx.get(f"{live.url}/health", timeout=BOUND_S)
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "retry-after" in health.headers
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    back = recovered(live, a)
    print(f"thawed Redis: the interrupted session answered 200 after {back:.2f}s")
    assert back < 5.0  # the stream's session is not left busy
    assert recovered(live, b) < 5.0
    assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
    assert turns(live, a) == 2 and turns(live, b) == 2  # the refused and failed turns left nothing
    errors = redis_errors(live)
    assert errors["request"] >= 1 and errors["commit"] == 1 and errors["health"] >= 1


def test_a_killed_redis_gives_503_and_a_restarted_one_carries_on(
    live: LiveServer, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    sid = f"k-{uuid.uuid4().hex[:8]}"
    ask(live, sid, "Hello!")
    ask(live, sid, "Tell me more.")
    assert redis_server.pid and redis_server.port
    os.kill(redis_server.pid, signal.SIGKILL)
    time.sleep(0.2)
    err, elapsed = refused(live, sid)
    print(f"\nkilled Redis: 503 after {elapsed:.2f}s")
    assert_unavailable(err, elapsed)
    assert httpx.get(f"{live.url}/health", timeout=BOUND_S).status_code == 503
    again = EmbeddedRedis(tmp_path / "redis-data", port=redis_server.port)
    again.start()
    try:
        back = recovered(live, sid)
        print(f"restarted Redis: 200 after {back:.2f}s")
        assert back < 5.0
        assert turns(live, sid) == 3  # both turns before the kill survived in the append-only file
    finally:
        again.stop(force=True)  # the live server is still connected: without force this Redis outlived pytest
