"""ThreadStore on a real Redis: capped items and responses, version-guarded writes, owners, TTLs, deletion."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.conversation.store import SessionStore
from server.conversation.threads import StoredResponse, Thread, ThreadStore
from server.schemas_responses import message_item


@pytest.fixture
async def threads(store: SessionStore) -> AsyncIterator[ThreadStore]:
    yield ThreadStore(store.redis, ttl_seconds=3600, max_items=6, prefix=store.prefix)


def stored(rid: str, thread: Thread, text: str) -> StoredResponse:
    question, answer = message_item("user", [text]), message_item("assistant", [f"re: {text}"])
    return StoredResponse(rid, thread.owner, thread.id, {"id": rid}, [question], [answer])


async def test_items_and_responses_stay_within_the_cap(threads: ThreadStore) -> None:
    thread = Thread("conv_1", "alice", kind="conversation")
    assert await threads.write(thread, [message_item("system", ["Sé bref 🙂"])], new=True)
    for turn in range(5):
        response = stored(f"resp_{turn}", thread, f"q{turn}")
        thread.head = response.id
        assert await threads.write(thread, [*response.input, *response.output], response)
    items = await threads.items(thread.id)
    # 11 items written, the newest 6 kept, oldest first.
    assert [i["content"][0]["text"] for i in items] == ["q2", "re: q2", "q3", "re: q3", "q4", "re: q4"]
    assert [await threads.response("alice", f"resp_{t}") is None for t in range(5)] == [False] * 5
    for turn in range(5, 8):  # 8 responses: the oldest two are deleted, not only forgotten
        assert await threads.write(thread, [], stored(f"resp_{turn}", thread, "x"))
    kept = [await threads.response("alice", f"resp_{t}") is not None for t in range(8)]
    assert kept == [False, False, True, True, True, True, True, True]
    assert await threads.redis.llen(threads._keys(thread.id)[2]) == 6
    for key in [*threads._keys(thread.id), threads._response_key("resp_7")]:
        assert 3500 < await threads.redis.ttl(key) <= 3600


async def test_a_stale_version_never_writes(threads: ThreadStore) -> None:
    thread = Thread("thread_1", "alice")
    assert await threads.write(thread, [message_item("user", ["a"])], new=True)
    assert not await threads.write(Thread("thread_1", "alice"), [], new=True)  # exists already
    first, second = await threads.get("alice", "thread_1"), await threads.get("alice", "thread_1")
    assert first is not None and second is not None and first.version == 1
    assert await threads.write(first, [message_item("user", ["b"])])
    assert not await threads.write(second, [message_item("user", ["c"])])
    assert second.version == 1  # the refused write leaves the caller's copy as read
    assert [i["content"][0]["text"] for i in await threads.items("thread_1")] == ["a", "b"]
    items = await threads.items("thread_1")
    assert not await threads.remove_item(second, items[0])
    assert await threads.remove_item(first, items[0])
    assert [i["content"][0]["text"] for i in await threads.items("thread_1")] == ["b"]


async def test_another_owner_sees_nothing_and_delete_takes_everything(threads: ThreadStore) -> None:
    thread = Thread("conv_2", "alice", kind="conversation", metadata={"k": "v"})
    response = stored("resp_a", thread, "hello")
    assert await threads.write(thread, [*response.input, *response.output], response, new=True)
    assert await threads.get("bob", "conv_2") is None and await threads.response("bob", "resp_a") is None
    got = await threads.get("alice", "conv_2")
    assert got is not None and got.metadata == {"k": "v"} and got.kind == "conversation"
    assert (await threads.response("alice", "resp_a")) == response
    await threads.delete("conv_2")
    assert await threads.get("alice", "conv_2") is None and await threads.response("alice", "resp_a") is None
    assert await threads.items("conv_2") == []
