"""The Responses and Conversations APIs over real HTTP on the real default model, through the official SDK;
responses, items, stream events and errors validated against the official OpenAI spec.

A chained response continues its session (only the new input prefilled) and equals the stateless chat reply
over the same messages (greedy); a branch forks a new session from the stored items and never mixes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import openai
import pytest

from streaming_core.loader import LoadedModel

from .conftest_http import KEY_A, KEY_B, MODEL, LiveServer, api_server, validate

pytestmark = pytest.mark.slow
SYSTEM = "You are a terse assistant."
QUESTIONS = ["Name a fruit.", "What colour is it?", "Name another one.", "Which is sweeter?", "Thanks!"]
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 8}
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
STREAM_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
}


@pytest.fixture(scope="module")
def live(pytestconfig: pytest.Config, default_model: LoadedModel) -> LiveServer:
    return api_server(pytestconfig, default_model)


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture(scope="module")
def other(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY_B, max_retries=0)


def raw(live: LiveServer, method: str, path: str, body: Any = None, key: str = KEY_A) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = None if body is None else json.dumps(body)  # ASCII escapes: lone surrogates travel as \udXXX
    return httpx.request(method, f"{live.url}/v1{path}", content=content, headers=headers, timeout=120)


def stateless(client: openai.OpenAI, messages: list[dict[str, str]]) -> str:
    """The chat route's greedy reply to the whole history, no session."""
    done = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    return done.choices[0].message.content or ""


def cached(response: Any) -> int:
    return int(response.usage.input_tokens_details.cached_tokens)


@pytest.fixture(scope="module")
def chain(client: openai.OpenAI, live: LiveServer) -> tuple[list[Any], list[dict[str, str]]]:
    """Five chained turns (instructions on the first only) and the chat messages they stand for."""
    responses: list[Any] = []
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS):
        extra = {"instructions": SYSTEM} if i == 0 else {"previous_response_id": responses[-1].id}
        r = client.responses.create(input=question, **GREEDY, **extra)
        validate("Response", raw(live, "GET", f"/responses/{r.id}").json())
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": r.output_text}]
        responses.append(r)
    return responses, messages


def test_a_chain_continues_its_session_and_equals_stateless_chat(
    client: openai.OpenAI, chain: tuple[list[Any], list[dict[str, str]]]
) -> None:
    responses, messages = chain
    for turn, r in enumerate(responses):
        assert r.output_text == stateless(client, messages[: 2 + 2 * turn]), f"turn {turn + 1}"
        assert r.status in ("completed", "incomplete")
    assert responses[0].instructions == SYSTEM and responses[1].previous_response_id == responses[0].id
    tokens = [cached(r) for r in responses]
    assert all(b > a for a, b in itertools.pairwise(tokens)), tokens
    for before, after in itertools.pairwise(responses):
        # Only the new turn is prefilled: everything the previous response covered is cached.
        assert cached(after) >= before.usage.input_tokens + before.usage.output_tokens - 2


def test_a_branch_forks_from_the_stored_items_and_never_mixes(
    client: openai.OpenAI, chain: tuple[list[Any], list[dict[str, str]]]
) -> None:
    responses, messages = chain
    branch = client.responses.create(
        input="Name a vegetable.", previous_response_id=responses[1].id, **GREEDY
    )
    history = [*messages[:5], {"role": "user", "content": "Name a vegetable."}]
    assert branch.output_text == stateless(client, history)
    # A new session: at most the head it shares with the chain is copied (prefix reuse), never the chain's
    # third turn and what follows.
    assert cached(branch) < responses[2].usage.input_tokens and branch.previous_response_id == responses[1].id
    # Both branches go on from their own sessions, each equal to its own history.
    on_branch = client.responses.create(input="And a fruit?", previous_response_id=branch.id, **GREEDY)
    history += [
        {"role": "assistant", "content": branch.output_text},
        {"role": "user", "content": "And a fruit?"},
    ]
    assert on_branch.output_text == stateless(client, history) and cached(on_branch) > 0
    main = client.responses.create(input="Bye.", previous_response_id=responses[-1].id, **GREEDY)
    assert main.output_text == stateless(client, [*messages, {"role": "user", "content": "Bye."}])
    assert cached(main) > cached(responses[-1])


def test_retrieve_input_items_and_delete(client: openai.OpenAI, live: LiveServer) -> None:
    r = client.responses.create(
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi."}]}],
        metadata={"k": "v"},
        **GREEDY,
    )
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    items = client.responses.input_items.list(r.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "Hi.")]  # type: ignore[union-attr]
    validate("ResponseItemList", raw(live, "GET", f"/responses/{r.id}/input_items").json())
    cancel = raw(live, "POST", f"/responses/{r.id}/cancel")
    assert cancel.status_code == 400 and cancel.json()["error"]["code"] == "response_not_cancellable"
    client.responses.delete(r.id)
    for path in (f"/responses/{r.id}", f"/responses/{r.id}/input_items"):
        assert raw(live, "GET", path).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="Again.", previous_response_id=r.id, **GREEDY)


def test_store_false_keeps_nothing(
    client: openai.OpenAI, chain: tuple[list[Any], list[dict[str, str]]]
) -> None:
    responses, messages = chain
    r = client.responses.create(input="Hi.", store=False, **GREEDY)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    # A store-false turn on a chain is stateless: the chain's head stays its head.
    aside = client.responses.create(
        input="Bye.", previous_response_id=responses[-1].id, store=False, **GREEDY
    )
    assert aside.output_text == stateless(client, [*messages, {"role": "user", "content": "Bye."}])
    # (its cached_tokens may be anything up to the whole chain: prefix reuse copies it from the chain's slot)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(aside.id)


def stream_events(live: LiveServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.stream("POST", f"{live.url}/v1/responses", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    names = [line[6:].strip() for line in lines if line.startswith("event:")]
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert names == [e["type"] for e in events]
    return events


@pytest.mark.parametrize("max_output_tokens", [3, 60])
def test_stream_events_follow_the_spec_in_order(
    live: LiveServer, client: openai.OpenAI, max_output_tokens: int
) -> None:
    body = {
        **GREEDY,
        "input": "Say hello in three words.",
        "stream": True,
        "max_output_tokens": max_output_tokens,
    }
    events = stream_events(live, body)
    for e in events:
        validate("ResponseStreamEvent", e)
        validate(EVENT_SCHEMAS[e["type"]], e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert kinds == [*STREAM_ORDER, *["response.output_text.delta"] * len(deltas), *STREAM_END, kinds[-1]]
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in deltas)
    assert text and text == events[-4]["text"] == final["output"][0]["content"][0]["text"]
    if max_output_tokens == 3:
        assert kinds[-1] == "response.incomplete" and final["status"] == "incomplete"
        assert (
            final["incomplete_details"] == {"reason": "max_output_tokens"}
            and final["usage"]["output_tokens"] == 3
        )
    else:
        assert kinds[-1] == "response.completed" and final["status"] == "completed"
    assert client.responses.retrieve(final["id"]).output_text == text
    sdk = [e.type for e in client.responses.create(input="Hi.", stream=True, **GREEDY)]
    assert sdk[:4] == STREAM_ORDER and sdk[-1] in ("response.completed", "response.incomplete")


def test_conversations_and_their_items(client: openai.OpenAI, live: LiveServer) -> None:
    conv = client.conversations.create(
        items=[{"type": "message", "role": "system", "content": SYSTEM}], metadata={"topic": "fruit"}
    )
    validate("ConversationResource", raw(live, "GET", f"/conversations/{conv.id}").json())
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "fruit"}
    messages = [{"role": "system", "content": SYSTEM}]
    tokens = []
    for question in QUESTIONS[:3]:
        r = client.responses.create(input=question, conversation=conv.id, **GREEDY)
        assert r.conversation is not None and r.conversation.id == conv.id
        messages.append({"role": "user", "content": question})
        assert r.output_text == stateless(client, messages)
        messages.append({"role": "assistant", "content": r.output_text})
        tokens.append(cached(r))
    assert tokens[0] < tokens[1] < tokens[2], tokens  # the first copies at most a head another slot held
    # Items added between responses are prefilled by the next one, on the same session.
    added = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "I like apples."}])
    validate(
        "ConversationItemList", raw(live, "GET", f"/conversations/{conv.id}/items?order=asc&limit=100").json()
    )
    r = client.responses.create(input="What do I like?", conversation=conv.id, **GREEDY)
    messages += [
        {"role": "user", "content": "I like apples."},
        {"role": "user", "content": "What do I like?"},
    ]
    assert r.output_text == stateless(client, messages) and cached(r) > tokens[-1]
    liked = r
    messages.append({"role": "assistant", "content": r.output_text})
    listed = client.conversations.items.list(conv.id, order="asc", limit=100)
    assert [(i.role, i.content[0].text) for i in listed.data] == [(m["role"], m["content"]) for m in messages]  # type: ignore[union-attr]
    newest = client.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest.data] == [i.id for i in listed.data[::-1][:2]] and newest.has_more
    item = added.data[0]
    assert client.conversations.items.retrieve(item.id, conversation_id=conv.id).id == item.id
    validate("ConversationItem", raw(live, "GET", f"/conversations/{conv.id}/items/{item.id}").json())
    # Deleting an item the session holds retires the session: the next response rebuilds without it.
    client.conversations.items.delete(item.id, conversation_id=conv.id)
    messages.remove({"role": "user", "content": "I like apples."})
    r = client.responses.create(input="Say it again.", conversation=conv.id, **GREEDY)
    # the head before the deleted item may be copied from a slot (prefix reuse), nothing past it
    assert cached(r) < liked.usage.input_tokens and r.output_text == stateless(
        client, [*messages, {"role": "user", "content": "Say it again."}]
    )
    assert client.conversations.update(conv.id, metadata={"topic": "veg"}).metadata == {"topic": "veg"}
    deleted = raw(live, "DELETE", f"/conversations/{conv.id}").json()
    validate("DeletedConversationResource", deleted)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_another_keys_objects_are_not_found(
    client: openai.OpenAI,
    other: openai.OpenAI,
    live: LiveServer,
    chain: tuple[list[Any], list[dict[str, str]]],
) -> None:
    head = chain[0][-1]
    conv = client.conversations.create(items=[{"role": "user", "content": "Secret."}])
    item = client.conversations.items.list(conv.id).data[0]
    attempts = [
        lambda: other.responses.retrieve(head.id),
        lambda: other.responses.delete(head.id),
        lambda: other.responses.input_items.list(head.id),
        lambda: other.responses.create(input="x", previous_response_id=head.id, **GREEDY),
        lambda: other.responses.create(input="x", conversation=conv.id, **GREEDY),
        lambda: other.conversations.retrieve(conv.id),
        lambda: other.conversations.delete(conv.id),
        lambda: other.conversations.items.list(conv.id),
        lambda: other.conversations.items.retrieve(item.id, conversation_id=conv.id),
        lambda: other.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as e:
            attempt()
        validate("Error", e.value.body)
    assert client.responses.retrieve(head.id).id == head.id  # untouched
    assert [i.id for i in client.conversations.items.list(conv.id).data] == [item.id]


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "x", "background": True}, "background"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        "input",
    ),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"input": "x", "conversation": "conv_x", "previous_response_id": "resp_x"}, "previous_response_id"),
    ({"input": "x", "max_tokens": 5}, "max_tokens"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "", "metadata": {"\ud800": ""}}, "metadata"),  # found by test_fuzz: a lone surrogate was a 500
    ({"input": "x", "metadata": {"k": "\udfff"}}, "metadata"),
    ({"input": "", "user": "\ud800"}, "user"),  # found by test_fuzz: echoed into Redis, a 500
    ({"input": "x", "previous_response_id": "resp_\ud800"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_\udc00"}, "conversation"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": [{"role": "assistant", "content": "x"}]}, "input"),
]


@pytest.mark.parametrize(
    ("body", "param"), BAD_BODIES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_BODIES)]
)
def test_bad_bodies_are_400_naming_the_field(live: LiveServer, body: dict[str, Any], param: str) -> None:
    r = raw(live, "POST", "/responses", {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    validate("Error", r.json()["error"])
    assert r.json()["error"]["param"] == param


def test_bad_ids_and_bad_conversation_bodies(live: LiveServer) -> None:
    for method, path in [
        ("GET", "/responses/resp_nope"),
        ("DELETE", "/responses/resp_nope"),
        ("GET", "/responses/resp_nope/input_items"),
        ("POST", "/responses/resp_nope/cancel"),
        ("GET", "/conversations/conv_nope"),
        ("DELETE", "/conversations/conv_nope"),
        ("GET", "/conversations/conv_nope/items"),
        ("GET", "/conversations/conv_nope/items/msg_nope"),
    ]:
        r = raw(live, method, path)
        assert r.status_code == 404, (method, path, r.text)
        validate("Error", r.json()["error"])
    chained = raw(live, "POST", "/responses", {"input": "x", "previous_response_id": "resp_nope"})
    assert chained.status_code == 404 and chained.json()["error"]["param"] == "previous_response_id"
    conv = raw(live, "POST", "/conversations", {}).json()
    for method, path, body in [
        ("POST", "/conversations", {"items": "hello"}),
        ("POST", "/conversations", {"items": [{"role": "user", "content": "x"}] * 21}),
        ("POST", f"/conversations/{conv['id']}", {}),
        ("POST", f"/conversations/{conv['id']}/items", {"items": []}),
        ("GET", f"/conversations/{conv['id']}/items?limit=0", None),
        ("GET", f"/conversations/{conv['id']}/items?after=msg_nope", None),
    ]:
        r = raw(live, method, path, body)
        assert r.status_code == 400, (method, path, r.text)
        validate("Error", r.json()["error"])
