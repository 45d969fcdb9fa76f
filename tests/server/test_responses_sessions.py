"""Responses on the session machinery, on tiny random models: a chain survives a restart (rebuilt from
Redis, the same session continued), a client that leaves a stream cancels the turn, storing nothing, and a
response that cannot be stored ends its stream with an error event and response.failed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.settings import ServerLimits, Settings

from .conftest_http import KEY_A, MODEL, LiveServer, validate
from .tiny import tiny_engine

GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 6}


def serve(tmp_path: Path, redis_url: str, tokenizer: Any) -> LiveServer:
    settings = Settings(api_keys=[KEY_A], data_dir=tmp_path, redis_url=redis_url, server=ServerLimits())
    return LiveServer(settings, tiny_engine(tokenizer))


def sdk(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)


def sessions(live: LiveServer) -> list[dict[str, Any]]:
    r = httpx.get(f"{live.url}/v1/sessions", headers={"Authorization": f"Bearer {KEY_A}"})
    return list(r.json()["data"])


def test_a_chain_survives_a_restart(tmp_path: Path, redis_url: str, tokenizer: Any) -> None:
    first = serve(tmp_path / "a", redis_url, tokenizer)
    try:
        client = sdk(first)
        before = {s["id"] for s in sessions(first)}
        r1 = client.responses.create(input="One.", instructions="Be brief.", **GREEDY)
        r2 = client.responses.create(input="Two.", previous_response_id=r1.id, **GREEDY)
        assert (r2.usage.input_tokens_details.cached_tokens if r2.usage else 0) > 0
    finally:
        first.stop()
    second = serve(tmp_path / "b", redis_url, tokenizer)
    try:
        client = sdk(second)
        r3 = client.responses.create(input="Three.", previous_response_id=r2.id, **GREEDY)
        history = [{"role": "system", "content": "Be brief."}]
        for question, reply in (("One.", r1), ("Two.", r2)):
            history += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": reply.output_text},
            ]
        history.append({"role": "user", "content": "Three."})
        done = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=6)  # type: ignore[arg-type]
        assert r3.output_text == done.choices[0].message.content
        # The chain's one session went on (rebuilt from its sinks and tail in Redis), not a fork.
        mine = [s for s in sessions(second) if s["id"] not in before]
        assert [(s["turns"], s["rebuilds"]) for s in mine] == [(3, 1)], mine
    finally:
        second.stop()


def test_leaving_a_stream_cancels_the_turn_and_stores_nothing(
    tmp_path: Path, redis_url: str, tokenizer: Any
) -> None:
    live = serve(tmp_path, redis_url, tokenizer)
    try:
        client = sdk(live)
        before = {s["id"] for s in sessions(live)}
        head = client.responses.create(input="Hello.", **GREEDY)
        body = {**GREEDY, "input": "Count.", "previous_response_id": head.id, "stream": True}
        body |= {"max_output_tokens": 2000, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.stream("POST", f"{live.url}/v1/responses", json=body, headers=headers, timeout=60) as s:
            lines = s.iter_lines()
            created = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
            next(line for line in lines if "response.output_text.delta" in line)
        left = time.monotonic()
        while live.lifecycle.serving.inflight and time.monotonic() - left < 10:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert not live.lifecycle.serving.inflight, "the turn still runs after its client left"  # type: ignore[union-attr]
        assert time.monotonic() - left < 5
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created["response"]["id"])
        # The chain's head is still its head: the next turn continues its session (rebuilt from Redis, as
        # an abandoned chat turn's is: the engine's KV held the uncommitted tokens).
        again = client.responses.create(input="Again.", previous_response_id=head.id, **GREEDY)
        assert again.usage is not None and again.usage.input_tokens > head.usage.input_tokens  # type: ignore[union-attr]
        mine = [s for s in sessions(live) if s["id"] not in before]
        assert [(s["turns"], s["rebuilds"]) for s in mine] == [(2, 1)], mine
    finally:
        live.stop()


def test_a_response_whose_conversation_goes_away_fails_in_the_stream(
    tmp_path: Path, redis_url: str, tokenizer: Any
) -> None:
    """The conversation is deleted while its response streams: the turn cannot be stored, so the stream
    ends with an error event and response.failed (both as the spec has them), and nothing is left."""
    live = serve(tmp_path, redis_url, tokenizer)
    try:
        client = sdk(live)
        conv = client.conversations.create()
        body = {**GREEDY, "input": "Count.", "conversation": conv.id, "stream": True}
        body |= {"max_output_tokens": 400, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.stream("POST", f"{live.url}/v1/responses", json=body, headers=headers, timeout=60) as s:
            lines = s.iter_lines()
            next(line for line in lines if "response.output_text.delta" in line)
            client.conversations.delete(conv.id)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        for event in events:
            validate("ResponseStreamEvent", event)
        error, failed = events[-2:]
        assert error["type"] == "error" and error["code"] == "conversation_conflict", error
        assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(failed["response"]["id"])
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conv.id)
    finally:
        live.stop()
