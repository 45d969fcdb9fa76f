"""Chat completions, completions and models over real HTTP, through the OpenAI SDK and raw SSE; every
response and stream chunk validated against the official OpenAI spec."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from streaming_core.loader import LoadedModel

from .conftest_http import KEY_A, MODEL, LiveServer, api_server, sse_events, validate

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "Say hello in three words."}]


@pytest.fixture(scope="module")
def live(pytestconfig: pytest.Config, default_model: LoadedModel) -> LiveServer:
    return api_server(pytestconfig, default_model)


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)


def sid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def raw_stream(live: LiveServer, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list]:
    hdrs = {"Authorization": f"Bearer {KEY_A}", **(headers or {})}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=hdrs, timeout=60) as r:
        lines = list(r.iter_lines())
    return r, sse_events(lines)


def test_models(client: openai.OpenAI, live: LiveServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    validate("ListModelsResponse", raw)
    assert client.models.retrieve(MODEL).id == MODEL


def test_non_stream_chat_matches_spec(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0
    )
    body = raw.http_response.json()
    validate("CreateChatCompletionResponse", body)
    done = raw.parse()
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert done.usage is not None and done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert "X-Session-ID" not in raw.headers and "session_id" not in body


def test_stream_chunks_order_and_spec(live: LiveServer) -> None:
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r, events = raw_stream(live, body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage, final = chunks[-1], chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    middle = chunks[1:-2]
    assert middle and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert all(c["choices"][0]["delta"]["content"] for c in middle)


def test_sdk_stream_equals_non_stream(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**args).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == whole


def test_session_echo_and_cached_tokens(client: openai.OpenAI, live: LiveServer) -> None:
    s = sid()
    messages = [{"role": "system", "content": "You are terse."}, *HELLO]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"session_id": s}
    )
    first = raw.parse()
    assert raw.headers["X-Session-ID"] == s and raw.http_response.json()["session_id"] == s
    # a new session computes its prompt, but for a head another slot held (prefix reuse, tested below)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    history = [*messages, {"role": "assistant", "content": first.choices[0].message.content}]
    history.append({"role": "user", "content": "And in French?"})
    r, events = raw_stream(
        live,
        {
            "model": MODEL,
            "messages": history,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"X-Session-ID": s},
    )
    assert r.headers["X-Session-ID"] == s
    chunks = events[:-1]
    assert all(c["session_id"] == s for c in chunks)
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > first.usage.prompt_tokens // 2
    assert usage["prompt_tokens"] > first.usage.prompt_tokens
    info = httpx.get(f"{live.url}/v1/sessions/{s}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert info["turns"] == 2 and info["last_turn"] == {
        "mode": "full",
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
    }


def test_a_shared_head_is_copied_not_computed_and_counted_as_cached(
    client: openai.OpenAI, live: LiveServer
) -> None:
    """Stateless requests with one system prompt: the second copies the first's head out of its slot, the
    third repeats the second and copies all but its last token; replies stay the same, usage and /metrics
    count what was copied."""
    system = {"role": "system", "content": f"You keep lighthouse {uuid.uuid4().hex[:8]} on a rocky coast."}

    def ask(question: str) -> tuple[str, int, int]:
        r = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=8, temperature=0
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return (
            r.choices[0].message.content or "",
            r.usage.prompt_tokens,
            r.usage.prompt_tokens_details.cached_tokens,
        )

    def reused_total() -> float:
        text = httpx.get(f"{live.url}/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("streamllm:prefix_reused_tokens_total")
        )

    _, _, head_cached = ask("Name one ship you saw.")
    before = reused_total()
    reply, prompt, cached = ask("What colour is the light?")
    assert head_cached < cached < prompt  # the system turn at least, never the whole prompt
    again, prompt_again, cached_again = ask("What colour is the light?")
    assert (again, prompt_again, cached_again) == (reply, prompt, prompt - 1)
    assert reused_total() - before == cached + cached_again


def test_stop_string_and_length(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": HELLO, "temperature": 0}
    free = client.chat.completions.create(**args, max_tokens=12).choices[0].message.content
    words = free.split()
    assert len(words) >= 2
    stopped = client.chat.completions.create(**args, max_tokens=12, stop=[words[1]]).choices[0]
    assert stopped.finish_reason == "stop" and words[1] not in stopped.message.content
    assert free.startswith(stopped.message.content)
    short = client.chat.completions.create(**args, max_completion_tokens=2).choices[0]
    assert short.finish_reason == "length"
    hi = [{"role": "user", "content": "What is 2+2?"}]
    natural = client.chat.completions.create(model=MODEL, messages=hi, temperature=0, max_tokens=40)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 40
    forced = client.chat.completions.create(
        model=MODEL, messages=hi, temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 40


def test_logprobs(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    validate("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    content = choice.logprobs.content
    assert len(content) >= 1
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_stream_logprobs_chunks(live: LiveServer) -> None:
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "logprobs": True,
    }
    _, events = raw_stream(live, body)
    content = [c for c in events[1:-2] if c["choices"][0]["logprobs"]]
    assert len(content) == 4
    for c in content:
        validate("CreateChatCompletionStreamResponse", c)


def test_seed_reproducible(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    a = client.chat.completions.create(**args, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**args, seed=1234).choices[0].message.content
    assert a == b


def test_text_content_parts_and_extras(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "Say hello"}, {"type": "text", "text": "in three words."}]
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": parts}],
        max_tokens=4,
        temperature=0,
        n=1,
        user="someone",
        tools=None,
        extra_body={
            "unknown_field": None,
            "another_extension": {"x": 1},
            "top_k": 5,
            "repetition_penalty": 1.1,
        },
    )
    assert done.choices[0].message.content


def test_completions(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    body = raw.http_response.json()
    validate("CreateCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["text"] and len(choice["logprobs"]["tokens"]) == body["usage"]["completion_tokens"]
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice["text"]


def test_completion_session_appends(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)
    s = sid()
    args = {"model": MODEL, "max_tokens": 4, "temperature": 0, "extra_headers": {"X-Session-ID": s}}
    first = client.completions.create(prompt="Once upon a time", **args)
    second = client.completions.create(prompt=" Then", **args)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    info = httpx.get(f"{live.url}/v1/sessions/{s}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert info["object"] == "session" and info["id"] == s and info["kind"] == "completion"
    assert info["turns"] == 2
