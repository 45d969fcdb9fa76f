"""ConversationManager semantics on the real default model: contradiction, ownership, busy sessions,
abandoned turns, restarts, completions, validation."""

from __future__ import annotations

import asyncio

import pytest

from server.conversation.errors import ConversationError
from server.conversation.manager import ConversationManager
from server.conversation.templates import encode, render
from streaming_core.engine import Rebuild
from streaming_core.sampler import SamplingParams

from .chat_templates import SYSTEM_LAST, with_template
from .conftest import make_engine
from .helpers import GREEDY, assistant, chat, generate, new_id, user

SHORT = SamplingParams(temperature=0, max_tokens=4)
SYSTEM = {"role": "system", "content": "You are a poet."}


async def conversation(manager, sid, questions, owner="me", params=GREEDY):
    """Full-resend turns; returns the history with the replies."""
    history = [SYSTEM]
    for q in questions:
        history.append(user(q))
        plan = await manager.plan_chat(owner, sid, history)
        history.append(assistant((await generate(manager, plan, params)).text))
    return history


async def stateless(manager, history, params=GREEDY):
    return await generate(manager, await manager.plan_chat("me", None, history), params)


def code(exc: pytest.ExceptionInfo[ConversationError]) -> tuple[int, str | None]:
    return exc.value.status, exc.value.code


async def test_contradicting_history_is_rebuilt_in_auto_and_refused_in_full(manager, engine):
    sid = new_id()
    history = await conversation(manager, sid, ["Hello! Who are you?", "Write a poem about the sea."])
    edited = [SYSTEM, user("Hello! What is your name?"), history[2], history[3]]
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", sid, edited, mode="full")
    assert code(e) == (409, "session_conflict")
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", sid, [user("unrelated")], mode="full")
    assert code(e) == (409, "session_conflict")
    plan = await manager.plan_chat("me", sid, edited)
    assert plan.mode == "rebuilt" and plan.cached_tokens == 0 and plan.rebuild is None
    assert plan.tokens == encode(manager.tokenizer, render(manager.tokenizer, edited))
    assert await asyncio.to_thread(engine.stats, sid) is None, "the old KV is gone before the rebuild"
    reply = await generate(manager, plan)
    assert reply.tokens == (await stateless(manager, edited)).tokens
    info = await manager.get("me", sid)
    assert info["turns"] == 3 and info["rebuilds"] == 1 and info["messages"] == len(edited) + 1
    follow = [*edited, assistant(reply.text), user("Shorter, please.")]
    assert (await manager.plan_chat("me", sid, follow)).mode == "full"


async def test_regenerate_and_explicit_delta(manager):
    sid = new_id()
    history = await conversation(manager, sid, ["Hello! Who are you?"], params=SHORT)
    plan = await manager.plan_chat("me", sid, history[:-1])  # regenerate the last reply
    assert plan.mode == "rebuilt"
    await manager.abandon(plan)
    plan = await manager.plan_chat("me", sid, [SYSTEM, user("Again?")], mode="delta")
    assert plan.mode == "delta" and plan.rebuild is not None, "the abandoned rebuild reset the engine's copy"
    assert plan.cached_tokens == 0 and plan.prompt_tokens == len(
        plan.rebuild.sinks + plan.rebuild.tail + plan.tokens
    )
    await manager.abandon(plan)


async def test_ownership_get_list_delete_and_ttl(manager, engine, store):
    a1, a2, b1 = new_id("a1"), new_id("a2"), new_id("b1")
    for owner, sid in (("alice", a1), ("alice", a2), ("bob", b1)):
        await conversation(manager, sid, ["Hi!"], owner=owner, params=SHORT)
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("bob", a1, [user("mine now?")])
    assert code(e) == (404, "session_not_found")
    assert await manager.get("bob", a1) is None and not await manager.delete("bob", a1)
    assert [s["id"] for s in await manager.list("alice")] == [a2, a1]
    assert [s["id"] for s in await manager.list("bob")] == [b1]
    info = await manager.get("alice", a1)
    assert info is not None and info["resident"] and info["turns"] == 1 and info["model"] == "smollm2"
    assert info["tokens_seen"] == info["cache_tokens"] > 0 and info["evicted"] == 0
    assert info["sink_tokens"] + info["window"] == 1024 and info["sink_tokens"] > 4  # pinned system prompt
    assert 0 < await store.ttl(a1) <= store.ttl_seconds
    assert await manager.delete("alice", a1)
    assert await manager.get("alice", a1) is None and await asyncio.to_thread(engine.stats, a1) is None
    assert [s["id"] for s in await manager.list("alice")] == [a2]
    assert (await manager.plan_chat("alice", a1, [user("hi")])).mode == "new"


async def test_one_request_at_a_time(manager):
    sid = new_id()
    plan = await manager.plan_chat("me", sid, [user("Hi!")])
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", sid, [user("Hi!")])
    assert code(e) == (409, "session_busy")
    await manager.abandon(plan)
    plan = await manager.plan_chat("me", sid, [user("Hi!")])
    assert plan.mode == "new"
    await generate(manager, plan, SHORT)
    await manager.plan_chat("me", sid, [user("More")])
    with pytest.raises(ConversationError) as e:
        await manager.delete("me", sid)
    assert code(e) == (409, "session_busy")


async def test_abandoned_turn_leaves_the_last_commit_to_rebuild_from(manager, engine):
    sid = new_id()
    history = await conversation(manager, sid, ["Hello! Who are you?"])
    history.append(user("Write a poem about the sea."))
    plan = await manager.plan_chat("me", sid, history)
    handle = manager.submit(plan, SamplingParams(temperature=0, max_tokens=1000), asyncio.get_running_loop())
    seen = 0
    async for _ in handle.stream:
        seen += 1
        if seen == 3:
            engine.abort(handle.request_id)
    await manager.abandon(plan)
    assert await asyncio.to_thread(engine.stats, sid) is None
    assert (await manager.get("me", sid))["turns"] == 1
    plan = await manager.plan_chat("me", sid, history)
    assert plan.mode == "full" and plan.rebuild is not None and plan.cached_tokens == 0
    reply = await generate(manager, plan)
    assert reply.tokens == (await stateless(manager, history)).tokens
    prompt = encode(manager.tokenizer, render(manager.tokenizer, history))
    assert (await asyncio.to_thread(engine.stats, sid)).tokens_seen == len(prompt) + len(reply.tokens) - 1


async def test_restart_rebuilds_from_redis_and_counters_go_on(manager, engine, store, default_model):
    sid = new_id()
    history = await conversation(manager, sid, ["Hello! Who are you?", "Write a poem about the sea."])
    before = await store.get(sid)
    assert before is not None
    fresh = make_engine(default_model, num_slots=2)
    fresh.start()
    try:
        restarted = ConversationManager(
            fresh, engine.tokenizer, store, model_name="smollm2", replica_id="other"
        )
        plan = await restarted.plan_chat("me", sid, [user("Write a poem about the moon.")])
        assert plan.mode == "delta" and plan.rebuild == Rebuild(before.sinks, before.tail, before.tokens_seen)
        assert plan.prompt_tokens == before.tokens_seen + len(plan.tokens)
        reply = await generate(restarted, plan)
        history += [user("Write a poem about the moon."), assistant(reply.text)]
        assert reply.tokens == (await stateless(manager, history[:-1])).tokens
        stats = await asyncio.to_thread(fresh.stats, sid)
        assert stats.tokens_seen == plan.prompt_tokens + len(reply.tokens) - 1
        after = await restarted.get("me", sid)
        assert after["turns"] == 3 and after["replica"] == "other" and after["rebuilds"] == 1
    finally:
        fresh.stop()
    plan = await manager.plan_chat("me", sid, [*history, user("Thanks!")])
    assert plan.rebuild is not None, "the first engine's copy is stale once another replica took a turn"
    assert (await generate(manager, plan, SHORT)).tokens == (
        await stateless(manager, [*history, user("Thanks!")], SHORT)
    ).tokens


async def test_completions_append_raw_text(manager, engine):
    sid = new_id()
    first = await manager.plan_completion("me", sid, "Once upon a time")
    assert first.mode == "new"
    r1 = await generate(manager, first, SamplingParams(temperature=0, max_tokens=6))
    second = await manager.plan_completion("me", sid, " Then the")
    assert second.mode == "delta" and second.cached_tokens == second.prompt_tokens - len(second.tokens)
    r2 = await generate(manager, second, SamplingParams(temperature=0, max_tokens=6))
    whole = await manager.plan_completion("me", None, "Once upon a time" + r1.text + " Then the")
    assert whole.tokens == [*first.tokens, *r1.tokens, *encode(manager.tokenizer, " Then the")]
    assert r2.tokens == (await generate(manager, whole, SamplingParams(temperature=0, max_tokens=6))).tokens
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", sid, [user("hi")])
    assert code(e) == (409, "session_conflict")
    chat_sid = new_id()
    await conversation(manager, chat_sid, ["Hi"], params=SHORT)
    with pytest.raises(ConversationError) as e:
        await manager.plan_completion("me", chat_sid, "raw")
    assert code(e) == (409, "session_conflict")


async def test_stateless_requests_store_nothing(manager, store):
    plan, reply = await chat(manager, "me", None, [user("Hi!")])
    assert plan.mode == "stateless" and plan.session_id is None and reply.tokens
    assert await manager.list("me") == [] and await store.redis.keys(f"{store.prefix}:*") == []


@pytest.mark.parametrize(
    ("messages", "mode", "param"),
    [
        ([user("x")], "sideways", "session_mode"),
        ([], "auto", "messages"),
        ([user("x"), assistant("y")], "auto", "messages"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "auto", "messages[0].content"),
    ],
)
async def test_invalid_requests_are_400(manager, messages, mode, param):
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", new_id(), messages, mode=mode)
    assert e.value.status == 400 and e.value.param == param
    assert not manager._busy


async def test_a_template_that_rerenders_history_rebuilds_or_refuses_deltas(engine, store):
    manager = ConversationManager(
        engine, with_template(engine.tokenizer, SYSTEM_LAST), store, model_name="m", replica_id="test"
    )
    sid = new_id()
    history = await conversation(manager, sid, ["Hi!"], params=SHORT)
    with pytest.raises(ConversationError) as e:
        await manager.plan_chat("me", sid, [user("More.")], mode="delta")
    assert code(e) == (400, "template_not_incremental")
    plan = await manager.plan_chat("me", sid, [*history, user("More.")])
    assert plan.mode == "rebuilt"
    await manager.abandon(plan)


async def test_a_turn_refused_before_it_consumed_anything_keeps_the_kv(manager, engine):
    """E.g. queue_full: abandoning it must not force a rebuild of an intact session."""
    sid = new_id()
    history = await conversation(manager, sid, ["Hi!"], params=SHORT)
    plan = await manager.plan_chat("me", sid, [*history, user("More.")])
    await manager.abandon(plan)
    assert await asyncio.to_thread(engine.stats, sid) is not None
    plan = await manager.plan_chat("me", sid, [*history, user("More.")])
    assert plan.rebuild is None and plan.mode == "full"
    await manager.abandon(plan)


async def test_a_session_dropped_between_planning_and_submit_is_rebuilt(manager, engine):
    """The KV tiers may drop an idle session's KV after its turn was planned on it: the turn must rebuild
    from the committed state rather than continue an empty session."""
    sid = new_id()
    history = await conversation(manager, sid, ["Hello! Who are you?"])
    history.append(user("Write a poem about the sea."))
    plan = await manager.plan_chat("me", sid, history)
    assert plan.mode == "full" and plan.rebuild is None, "planned on the KV the engine holds"
    assert await asyncio.to_thread(engine.close_session, sid)  # what a drop from the last tier does
    reply = await generate(manager, plan)
    assert reply.tokens == (await stateless(manager, history)).tokens
    stats = await asyncio.to_thread(engine.stats, sid)
    assert stats.tokens_seen == plan.prompt_tokens + len(reply.tokens) - 1
    assert (await manager.get("me", sid))["turns"] == 2
