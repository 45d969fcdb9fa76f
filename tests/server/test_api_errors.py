"""Every error class over real HTTP: OpenAI's error body with the right status, param and code, never a 500."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import server.lifecycle
from streaming_core.engine import Engine
from streaming_core.loader import LoadedModel

from .conftest_http import KEY_A, KEY_B, MODEL, LiveServer, api_server, make_engine, make_settings, validate

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def live(pytestconfig: pytest.Config, default_model: LoadedModel) -> LiveServer:
    return api_server(pytestconfig, default_model)


def post(live: LiveServer, body: Any, key: str | None = KEY_A, path: str = "chat/completions", **kw: Any):
    """POST raw JSON (json.dumps escapes lone surrogates, which httpx's json= cannot encode)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    headers.update(kw.pop("headers", {}))
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{live.url}/v1/{path}", content=content, headers=headers, timeout=60, **kw)


def error_of(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat(**fields: Any) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 2, **fields}


def test_invalid_json_and_bodies(live: LiveServer) -> None:
    error_of(post(live, b'{"model": "x", "messages": ['), 400, code="invalid_json")
    error_of(post(live, b"[1, 2]"), 400)
    error_of(post(live, b""), 400)
    error_of(post(live, {"messages": HELLO}), 400, param="model")
    error_of(post(live, {"model": MODEL}), 400, param="messages")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"seed": 2**70}, "seed"),
        ({"n": 1.5}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ({"user": "\ud800"}, "user"),
        ({"model": "\udfff"}, "model"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
        ({"session_id": "bad id!"}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"session_id": 42}, "session_id"),
    ],
)
def test_invalid_values_are_400(live: LiveServer, fields: dict, param: str | None) -> None:
    error_of(post(live, chat(**fields)), 400, param=param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)
def test_unsupported_features_name_their_param(live: LiveServer, fields: dict, param: str) -> None:
    err = error_of(post(live, chat(**fields)), 400, param=param)
    assert "not supported" in err["message"]


def test_neutral_values_of_unsupported_fields_pass(live: LiveServer) -> None:
    neutral = {"tools": None, "n": 1, "logit_bias": {}, "response_format": {"type": "text"}, "whatever": None}
    assert post(live, chat(**neutral)).status_code == 200


def test_completions_errors(live: LiveServer) -> None:
    base = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    error_of(post(live, {**base, "prompt": [1, 2, 3]}, path="completions"), 400, param="prompt")
    error_of(post(live, {**base, "echo": True}, path="completions"), 400, param="echo")
    error_of(post(live, {**base, "best_of": 3}, path="completions"), 400, param="best_of")
    error_of(post(live, {**base, "logprobs": 9}, path="completions"), 400, param="logprobs")


def test_unknown_model_route_and_method(live: LiveServer) -> None:
    error_of(post(live, chat(model="gpt-4o")), 404, param="model", code="model_not_found")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    error_of(httpx.get(f"{live.url}/v1/nowhere", headers={"Authorization": f"Bearer {KEY_A}"}), 404)
    error_of(httpx.get(f"{live.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}), 405)


def test_request_limits(live: LiveServer) -> None:
    many = [{"role": "user", "content": "hi"}] * 65
    error_of(post(live, chat(messages=many)), 400, param="messages")
    long = [{"role": "user", "content": "lighthouse " * 5000}]
    error_of(post(live, chat(messages=long)), 400, param="messages", code="context_length_exceeded")


def test_session_header_and_body_must_agree(live: LiveServer) -> None:
    r = post(live, chat(session_id="one"), headers={"X-Session-ID": "two"})
    error_of(r, 400, param="session_id")


def test_auth_and_owner_isolation(live: LiveServer) -> None:
    error_of(post(live, chat(), key=None), 401, code="invalid_api_key")
    r = post(live, chat(), key="sk-wrong")
    error_of(r, 401, code="invalid_api_key")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    sid = f"own-{uuid.uuid4().hex[:8]}"
    assert post(live, chat(session_id=sid)).status_code == 200
    auth = {"A": {"Authorization": f"Bearer {KEY_A}"}, "B": {"Authorization": f"Bearer {KEY_B}"}}
    assert httpx.get(f"{live.url}/v1/sessions/{sid}", headers=auth["A"]).status_code == 200
    error_of(httpx.get(f"{live.url}/v1/sessions/{sid}", headers=auth["B"]), 404, code="session_not_found")
    error_of(httpx.delete(f"{live.url}/v1/sessions/{sid}", headers=auth["B"]), 404)
    listed = httpx.get(f"{live.url}/v1/sessions", headers=auth["A"]).json()
    assert listed["object"] == "list" and sid in [s["id"] for s in listed["data"]]
    listed = httpx.get(f"{live.url}/v1/sessions", headers=auth["B"]).json()
    assert sid not in [s["id"] for s in listed["data"]]
    assert post(live, chat(session_id=sid), key=KEY_B).status_code in (404, 409)
    assert httpx.delete(f"{live.url}/v1/sessions/{sid}", headers=auth["A"]).json()["deleted"] is True
    error_of(httpx.get(f"{live.url}/v1/sessions/{sid}", headers=auth["A"]), 404)


def test_body_too_large(live: LiveServer) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 70_000}])
    error_of(post(live, big), 413, code="body_too_large")

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    error_of(r, 413)


async def _first_chunk(client: httpx.AsyncClient, body: dict, headers: dict, started: asyncio.Event) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                started.set()
                await asyncio.sleep(30)


async def test_busy_session_is_409(live: LiveServer) -> None:
    sid = f"busy-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    long = chat(session_id=sid, max_tokens=400, stream=True, temperature=1.0, seed=3)
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
        started = asyncio.Event()
        holder = asyncio.create_task(_first_chunk(client, long, headers, started))
        await asyncio.wait_for(started.wait(), 30)
        r = await client.post("/v1/chat/completions", json=chat(session_id=sid), headers=headers)
        error_of(r, 409, code="session_busy")
        holder.cancel()


async def test_queue_full_is_429(tmp_path: Path, default_model: LoadedModel) -> None:
    tiny = LiveServer(make_settings(tmp_path), make_engine(default_model, num_slots=1, max_waiting=1))
    try:
        long = chat(max_tokens=400, stream=True, temperature=1.0, seed=1)
        async with httpx.AsyncClient(base_url=tiny.url, timeout=60) as client:
            started = asyncio.Event()
            running = asyncio.create_task(_first_chunk(client, long, {}, started))
            await asyncio.wait_for(started.wait(), 30)
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=chat(max_tokens=1)))
            while not tiny.engine.scheduler.waiting:
                await asyncio.sleep(0.01)
            error_of(await client.post("/v1/chat/completions", json=chat()), 429, code="queue_full")
            running.cancel()
            assert (await asyncio.wait_for(queued, 30)).status_code == 200
    finally:
        tiny.stop()


def test_not_ready_is_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model: LoadedModel
) -> None:
    release = threading.Event()
    engine = make_engine(default_model, num_slots=1)

    def slow_build(*args: Any) -> Engine:
        release.wait(30)
        return engine

    monkeypatch.setattr(server.lifecycle, "build_engine", slow_build)
    starting = LiveServer(make_settings(tmp_path), wait_ready=False)
    try:
        error_of(httpx.get(f"{starting.url}/health"), 503, code="not_ready")
        error_of(post(starting, chat(), key=None), 503, code="not_ready")
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=f"{starting.url}/v1", api_key="x", max_retries=0).models.list()
        release.set()
        starting._wait(lambda: httpx.get(f"{starting.url}/health").status_code == 200, "never ready")
        assert post(starting, chat(), key=None).status_code == 200
    finally:
        release.set()
        starting.stop()
