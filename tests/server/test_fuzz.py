"""Property-based fuzzing of every route over real HTTP (uvicorn, embedded Redis), on a tiny random model.

Bodies are near-valid requests with fields swapped for arbitrary JSON, or arbitrary JSON outright; headers
(Authorization, Content-Type, X-Session-ID) and session ids in paths are drawn too. Properties: never a 5xx,
never a 422, every error (response or stream event) in OpenAI's format, and a session created before the
fuzzing (owned by another key, whose id the fuzzer also uses) keeps exactly the same record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest_http import KEY_A, KEY_B, MODEL, LiveServer, make_settings, sse_events, validate
from .tiny import tiny_engine

SENTINEL = "fuzz-sentinel"
EXAMPLES = int(os.environ.get("STREAMLLM_FUZZ_EXAMPLES", "60"))
"""Examples per fuzz test: 60 keeps the file well under a minute; raise it for a deeper search."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[LiveServer]:
    """KEY_A and KEY_B accepted; the tiny engine (real chat template)."""
    engine = tiny_engine(tokenizer)
    limits = {"max_body_bytes": 16 * 1024, "max_tokens_cap": 16, "default_max_tokens": 4, "max_messages": 16}
    server = LiveServer(
        make_settings(Path(tmp_path_factory.mktemp("fuzz")), (KEY_A, KEY_B), **limits), engine
    )
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
        for payload in events[:-1]:
            assert "error" not in payload, payload


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
text = st.text(max_size=40) | st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "🦜" * 5, "<|im_end|>"])
session_ids = st.sampled_from([SENTINEL, "", " ", "a" * 300, "x/y", "ok-id", "é", "../x"]) | st.text(
    max_size=12
)
content_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values},
    optional={"text": text | json_values, "image_url": json_values},
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "developer"]), "content": text},
    optional={"name": text},
)
odd_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bogus"]) | json_values},
    optional={"content": text | json_values | st.lists(content_part, max_size=3), "name": json_values},
)
messages = (
    st.lists(message, min_size=1, max_size=4).map(lambda m: [*m, {"role": "user", "content": "Hi."}])
    | st.lists(message | odd_message, max_size=4)
    | json_values
)


VALID: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 6),
    "stream": st.booleans(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**63),
    "stop": st.lists(text, max_size=4) | text,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "session_id": session_ids,
    "user": text,
    "ignore_eos": st.booleans(),
}
"""Fields and values a request may carry (session_ids include invalid and foreign ones on purpose)."""


def near_valid(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid request (required fields, some optional ones), then up to two fields set to arbitrary JSON,
    one dropped, or an unknown one added: many requests run, and each invalid one is invalid in one place."""
    names = sorted({*required, *optional, *VALID})
    valid = st.fixed_dictionaries(required, optional={**VALID, **optional})
    mutations = st.dictionaries(
        st.sampled_from(names) | st.text(min_size=1, max_size=8), json_values, max_size=2
    )
    return st.tuples(valid, mutations, st.none() | st.sampled_from(names)).map(
        lambda p: {k: v for k, v in {**p[0], **p[1]}.items() if k != p[2]}
    )


chat_bodies = near_valid(
    {"model": st.just(MODEL), "messages": messages},
    {
        "max_completion_tokens": st.integers(1, 6),
        "session_mode": st.sampled_from(["auto", "full", "delta"]),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "response_format": st.just({"type": "text"}),
        "n": st.just(1),
    },
)
completion_bodies = near_valid(
    {"model": st.just(MODEL), "prompt": text | st.lists(text, min_size=1, max_size=1)},
    {"logprobs": st.integers(0, 5), "echo": st.just(False), "suffix": st.just("")},
)
auths = st.sampled_from([KEY_A, KEY_A, KEY_A, None, "wrong", "", f"{KEY_A} extra"])
content_types = st.sampled_from(
    [
        "application/json",
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "multipart/form-data",
    ]
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(str.strip)
"""Printable ASCII (h11 refuses to send surrounding whitespace, so the server never sees it)."""


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def parses(raw: bytes) -> bool:
    """Whether the body is JSON, judged as the server's parser (json.loads of the bytes) judges it."""
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


unparsable = st.one_of(
    st.integers(1, 6000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b'{"max_tokens": 1' + b"0" * n + b"}"),
    st.binary(min_size=1, max_size=8).map(lambda b: b'{"model": "' + b + b'"}'),
)
"""Bodies that are JSON only in shape: nesting past the parser's recursion limit, integers past Python's
digit limit, bytes that are not UTF-8."""


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
    raw=st.one_of(
        st.none(), st.none(), st.none(), st.binary(max_size=64), json_values.map(json_bytes), unparsable
    ),
    auth=auths,
    content_type=content_types,
    session=st.none() | header_text | st.just(SENTINEL),
)
def test_generation_routes(live, sentinel, path, chat, completion, raw, auth, content_type, session) -> None:
    body = raw if raw is not None else chat if path.endswith("chat/completions") else completion
    r = request(live, "POST", path, body, auth, **headers(content_type, session))
    check(r)
    if raw and auth == KEY_A and content_type.split(";")[0] in ("", "application/json") and not parses(raw):
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert session_record(live) == sentinel


@FUZZ
@given(
    method=st.sampled_from(["GET", "GET", "GET", "DELETE", "DELETE", "POST", "PATCH"]),
    route=st.sampled_from(
        [
            *("/v1/sessions", "/v1/sessions/{}", "/v1/models", "/v1/models/{}", "/health", "/v1/{}"),
            *("/v1/responses/{}", "/v1/responses/{}/input_items", "/v1/responses/{}/cancel"),
            *("/v1/conversations", "/v1/conversations/{}", "/v1/conversations/{}/items"),
            "/v1/conversations/{}/items/{}",
        ]
    ),
    sid=session_ids | st.sampled_from(["@conversation", "@response", "@item"]),
    auth=auths,
    body=st.none() | json_values.map(json_bytes),
)
def test_resource_routes(live, sentinel, foreign, method, route, sid, auth, body) -> None:
    sid = foreign.get(sid, sid)
    path = route.format(*[quote(sid, safe="")] * route.count("{}"))
    check(request(live, method, path, body, auth))
    assert session_record(live) == sentinel
    assert foreign_state(live, foreign) == foreign["state"]


response_ids = session_ids | st.sampled_from(["@conversation", "@response", "resp_", "conv_"])
response_input = text | st.lists(message | odd_message | content_part | json_values, min_size=1, max_size=3)
response_bodies = near_valid(
    {"input": response_input},
    {
        "model": st.just(MODEL),
        "instructions": text,
        "max_output_tokens": st.integers(1, 6),
        "store": st.booleans(),
        "previous_response_id": response_ids,
        "conversation": response_ids | st.fixed_dictionaries({"id": response_ids}),
        "metadata": st.dictionaries(text, text, max_size=3),
        "truncation": st.sampled_from(["auto", "disabled"]),
        "tools": st.just([]),
        "tool_choice": st.sampled_from(["auto", "none"]),
    },
)


@pytest.fixture(scope="module")
def foreign(live: LiveServer) -> dict[str, Any]:
    """A conversation of KEY_B with one response: the fuzzer (KEY_A) names their ids too."""
    conv = request(live, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "Hi."}]}, KEY_B)
    assert conv.status_code == 200, conv.text
    body = {"model": MODEL, "input": "Hello?", "conversation": conv.json()["id"], "max_output_tokens": 3}
    response = request(live, "POST", "/v1/responses", body, KEY_B)
    assert response.status_code == 200, response.text
    out = {"@conversation": conv.json()["id"], "@response": response.json()["id"]}
    out["@item"] = response.json()["output"][0]["id"]
    out["state"] = foreign_state(live, out)
    return out


def foreign_state(live: LiveServer, foreign: dict[str, Any]) -> tuple[Any, ...]:
    conv, response = foreign["@conversation"], foreign["@response"]
    items = request(live, "GET", f"/v1/conversations/{conv}/items", auth=KEY_B)
    got = request(live, "GET", f"/v1/responses/{response}", auth=KEY_B)
    assert items.status_code == got.status_code == 200, (items.text, got.text)
    return items.json(), got.json()


@FUZZ
@given(body=response_bodies, raw=st.none() | st.none() | json_values.map(json_bytes), auth=auths)
def test_responses_route(live, foreign, body, raw, auth) -> None:
    for name in ("previous_response_id", "conversation"):
        if isinstance(body.get(name), str):
            body[name] = foreign.get(body[name], body[name])
    r = request(live, "POST", "/v1/responses", raw if raw is not None else body, auth)
    if not r.headers.get("content-type", "").startswith("text/event-stream"):
        check(r)
    else:  # the Responses API's own stream: no [DONE], a final response.* event
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
        for event in events:
            validate("ResponseStreamEvent", event)
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
    assert foreign_state(live, foreign) == foreign["state"]


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b'{"max_tokens": 1' + b"0" * 5000 + b"}", b'{"model": "\xff"}'],
    ids=["nested-too-deeply", "integer-too-long", "not-utf8"],
)
def test_bodies_json_cannot_parse_are_invalid_json(live, raw) -> None:
    """Found by the fuzzer: these reached FastAPI's bare 'There was an error parsing the body' (code null)."""
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = request(live, "POST", path, raw)
        check(r)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        assert r.json()["error"]["message"].startswith("request body is not valid JSON: ")


def test_the_sentinel_is_untouched(live, sentinel, foreign) -> None:
    """KEY_B's sessions are what they were (each fuzz example above also checks the record): the
    sentinel and the session of its conversation."""
    assert session_record(live) == sentinel
    assert foreign_state(live, foreign) == foreign["state"]
    r = request(live, "GET", "/v1/sessions", auth=KEY_B)
    ids = sorted(s["id"] for s in r.json()["data"])
    assert ids[1:] == [SENTINEL] and ids[0].startswith(f"{foreign['@conversation']}:"), ids
