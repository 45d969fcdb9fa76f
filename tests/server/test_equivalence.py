"""The core invariant on the real default model, greedy: while a conversation fits in the cache, a session's
tokens are the tokenization of the full rendered conversation and its replies equal a stateless request
carrying the whole history, whether the client resends the history or only the new turn, for ChatML and
for Llama-2, Llama-3 and Mistral style templates."""

from __future__ import annotations

import asyncio

import pytest

from server.conversation.manager import ConversationManager
from server.conversation.templates import encode, render

from .chat_templates import TEMPLATES, with_template
from .helpers import assistant, generate, new_id, user

SYSTEM = {"role": "system", "content": "You are a poet."}
QUESTIONS = ["Hello! Who are you?", "Write a poem about the sea.", "Write a poem about the moon."]
"""Chosen so that the small model answers at some length under every template (it often answers nothing
under foreign ones), ending by length, by EOS, and with whitespace the templates trim."""


@pytest.mark.parametrize("name", list(TEMPLATES))
async def test_session_turns_equal_stateless_full_history(engine, store, name):
    tok = with_template(engine.tokenizer, TEMPLATES[name])
    manager = ConversationManager(engine, tok, store, model_name="smollm2", replica_id="test")
    full_id, delta_id = new_id(f"{name}-full"), new_id(f"{name}-delta")
    history, lengths = [SYSTEM], []
    for i, question in enumerate(QUESTIONS):
        history.append(user(question))
        prompt = encode(tok, render(tok, history))
        plans = [
            await manager.plan_chat("me", full_id, history),
            await manager.plan_chat("me", delta_id, history if i == 0 else [history[-1]]),
            await manager.plan_chat("me", None, history),
        ]
        assert [p.mode for p in plans] == (
            ["new", "new", "stateless"] if i == 0 else ["full", "delta", "stateless"]
        )
        assert plans[2].tokens == prompt
        replies = await asyncio.gather(*(generate(manager, p, commit=False) for p in plans))
        for plan, reply in zip(plans[:2], replies, strict=False):
            state = await asyncio.to_thread(engine.session_state, plan.session_id)
            assert [*state.sinks, *state.tail] == prompt + reply.tokens[:-1]
            assert state.tokens_seen == len(prompt) + len(reply.tokens) - 1
            assert plan.prompt_tokens == len(prompt) and plan.boundary_clean
            assert plan.cached_tokens == (0 if plan.rebuild or i == 0 else len(prompt) - len(plan.tokens))
            await manager.commit(plan, reply.text, reply.finish)
        assert replies[0].tokens == replies[2].tokens, f"turn {i}: full-resend session differs from stateless"
        assert replies[1].tokens == replies[2].tokens, f"turn {i}: delta-only session differs from stateless"
        history.append(assistant(replies[2].text))
        lengths.append(len(replies[2].tokens))
    assert sum(n >= 4 for n in lengths) >= 2, f"replies too short to test anything: {lengths}"
