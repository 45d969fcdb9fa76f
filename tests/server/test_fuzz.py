"""Property-based fuzzing of every route over real HTTP (uvicorn, embedded Redis), on a tiny random model.

Bodies are near-valid requests with fields swapped for arbitrary JSON, or arbitrary JSON outright; headers
(Authorization, Content-Type, X-Session-ID) and session ids in paths are drawn too. Properties: never a 5xx,
never a 422, every error (response or stream event) in OpenAI's format, and a session created before the
fuzzing (owned by another key, whose id the fuzzer also uses) keeps exactly the same record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.models import build_model

from ..streaming_core.helpers import tiny_llama
from .conftest_http import KEY_A, KEY_B, MODEL, LiveServer, make_settings, sse_events, validate

SENTINEL = "fuzz-sentinel"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[LiveServer]:
    """KEY_A and KEY_B accepted; a 2-layer random Llama with the default model's tokenizer (real templates)."""
    hf = tiny_llama(seed=1, vocab_size=len(tokenizer), max_position_embeddings=2048)
    cache = CacheConfig(sink_tokens=4, window=252, num_slots=4, prefill_chunk=128)
    engine = Engine(build_model(hf, torch.float32, "cpu"), tokenizer, EngineConfig(cache=cache), {0})
    limits = {"max_body_bytes": 16 * 1024, "max_tokens_cap": 16, "default_max_tokens": 4, "max_messages": 16}
    server = LiveServer(make_settings(Path(tmp_path_factory.mktemp("fuzz")), (KEY_A, KEY_B), **limits), engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sentinel(live: LiveServer) -> dict[str, Any]:
    """A session of KEY_B with two turns, as GET shows it before any fuzzing."""
    for text in ("Hello there.", "And again."):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 3}
        r = request(live, "POST", "/v1/chat/completions", body | {"session_id": SENTINEL}, auth=KEY_B)
        assert r.status_code == 200, r.text
    return session_record(live)


def session_record(live: LiveServer) -> dict[str, Any]:
    r = request(live, "GET", f"/v1/sessions/{SENTINEL}", auth=KEY_B)
    assert r.status_code == 200, r.text
    return {k: v for k, v in r.json().items() if k != "resident"}  # residency moves with the LRU


def request(
    live: LiveServer, method: str, path: str, body: Any = None, auth: str | None = KEY_A, **headers: str
) -> httpx.Response:
    """Send raw bytes: json.dumps escapes lone surrogates, which are part of what is fuzzed."""
    h = {"Authorization": f"Bearer {auth}"} if auth else {}
    h.update(headers)
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if content is not None:
        h.setdefault("Content-Type", "application/json")
    return httpx.request(method, f"{live.url}{path}", content=content, headers=h, timeout=60)


def check(r: httpx.Response) -> None:
    """The properties every answer must have."""
    assert r.status_code < 500 and r.status_code != 422, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        validate("ErrorResponse", body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(r.text.splitlines())
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for event in events[:-1]:
            assert "error" not in event, event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
text = st.text(max_size=40) | st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "🦜" * 5, "<|im_end|>"])
session_ids = st.sampled_from([SENTINEL, "", " ", "a" * 300, "x/y", "ok-id", "é", "../x"]) | st.text(max_size=12)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bogus"]) | json_values},
        optional={"content": text | json_values | st.just([{"type": "text", "text": "hi"}]), "name": text},
    ),
    max_size=4,
) | json_values


def near_valid(extra: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid request with some fields replaced by drawn (often invalid) values and unknown fields added."""
    fields = {
        "model": st.sampled_from([MODEL, "other"]) | json_values,
        "max_tokens": st.integers(-2, 20) | json_values,
        "stream": st.booleans() | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-1, 2) | json_values,
        "top_k": st.integers(-3, 60) | json_values,
        "seed": st.integers(-(2**64), 2**65) | json_values,
        "stop": st.lists(text, max_size=5) | text | json_values,
        "presence_penalty": st.floats(-3, 3) | json_values,
        "frequency_penalty": st.floats(-3, 3) | json_values,
        "repetition_penalty": st.floats(-1, 3) | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
        "session_id": session_ids | json_values,
        "logprobs": st.booleans() | st.integers(-1, 8) | json_values,
        "top_logprobs": st.integers(-1, 25) | json_values,
        "n": st.integers(0, 3) | json_values,
        "user": text | json_values,
        **extra,
    }
    valid = st.fixed_dictionaries({}, optional=fields)
    unknown = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=2)
    return st.tuples(valid, unknown).map(lambda p: {**p[1], **p[0]})


chat_bodies = near_valid(
    {
        "messages": messages,
        "max_completion_tokens": st.integers(-1, 20) | json_values,
        "session_mode": st.sampled_from(["auto", "full", "delta", "other"]) | json_values,
        "tools": json_values,
        "response_format": st.just({"type": "text"}) | json_values,
    }
)
completion_bodies = near_valid({"prompt": text | st.lists(text, max_size=2) | json_values, "echo": json_values})
auths = st.sampled_from([KEY_A, KEY_A, KEY_A, None, "wrong", "", f"{KEY_A} extra"])
content_types = st.sampled_from(
    ["application/json", "application/json", "text/plain", "application/x-www-form-urlencoded", "", "multipart/form-data"]
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


def headers(content_type: str, session: str | None) -> dict[str, str]:
    out = {"Content-Type": content_type} if content_type else {}
    if session is not None:
        out["X-Session-ID"] = session
    return out


@FUZZ
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    chat=chat_bodies,
    completion=completion_bodies,
    raw=st.none() | st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
    auth=auths,
    content_type=content_types,
    session=st.none() | header_text | st.just(SENTINEL),
)
def test_generation_routes(live, sentinel, path, chat, completion, raw, auth, content_type, session) -> None:
    body = raw if raw is not None else chat if path.endswith("chat/completions") else completion
    check(request(live, "POST", path, body, auth, **headers(content_type, session)))
    assert session_record(live) == sentinel


@FUZZ
@given(
    method=st.sampled_from(["GET", "GET", "DELETE", "POST", "PUT"]),
    route=st.sampled_from(["/v1/sessions", "/v1/sessions/{}", "/v1/models", "/v1/models/{}", "/health", "/v1/{}"]),
    sid=session_ids,
    auth=auths,
    body=st.none() | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_resource_routes(live, sentinel, method, route, sid, auth, body) -> None:
    path = route.format(quote(sid, safe="")) if "{}" in route else route
    check(request(live, method, path, body, auth))
    assert session_record(live) == sentinel


def test_the_sentinel_is_untouched(live, sentinel) -> None:
    """KEY_B's sessions are what they were (each fuzz example above also checks the record)."""
    assert session_record(live) == sentinel
    r = request(live, "GET", "/v1/sessions", auth=KEY_B)
    assert [s["id"] for s in r.json()["data"]] == [SENTINEL]
