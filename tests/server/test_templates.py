"""Turn deltas, bounded render contexts, settling a turn's end, and the pinned system head, on the default
tokenizer with ChatML and Llama-2, Llama-3 and Mistral style templates (no model weights needed)."""

from __future__ import annotations

import pytest

from server.conversation.templates import (
    CONTEXT_CHARS,
    KVEnd,
    TemplateError,
    bounded_context,
    consumed,
    continuation,
    encode,
    render,
    settle,
    system_head,
    turn_delta,
)

from .chat_templates import SYSTEM_LAST, TEMPLATES, with_template
from .helpers import assistant, user

SYSTEM = {"role": "system", "content": "You are a poet."}
CONVERSATION = [
    SYSTEM,
    user("Hello! Who are you?"),
    assistant("I am a poet."),
    user("Write about the sea."),
    assistant("Waves fold\nover stones."),
    user("Now the moon."),
]


@pytest.fixture(params=list(TEMPLATES))
def tok(request, tokenizer):
    return with_template(tokenizer, TEMPLATES[request.param])


def test_delta_from_full_history_and_from_bounded_context_agree(tok):
    """A session holding render(history) + the settled reply gets B[len(A):], tokenized as B would be; the
    bounded stand-in context (system + last exchange) renders the very same delta, which is what
    delta-only sessions rely on."""
    for n in (3, 5):
        history, reply, new = CONVERSATION[: n - 1], CONVERSATION[n - 1]["content"], CONVERSATION[n : n + 1]
        prompt = render(tok, history)
        after = continuation(tok, history, reply)
        assert after is not None
        end = settle(tok, prompt, encode(tok, prompt), encode(tok, reply), after, max_trim=100).end
        delta, b = turn_delta(tok, history, reply, end, new)
        assert b == render(tok, CONVERSATION[: n + 1]) and b.endswith(delta.text)
        assert delta.clean and encode(tok, b) == encode(tok, b[: len(b) - len(delta.text)]) + delta.tokens
        bounded, _ = turn_delta(tok, bounded_context(history), reply, end, new)
        assert bounded.text == delta.text


def test_kv_end_back_and_ahead(tok):
    history = CONVERSATION[:2]
    prompt = render(tok, history)
    assert consumed(tok, history, KVEnd()) == prompt
    assert consumed(tok, history, KVEnd(ahead="I am")) == prompt + "I am"
    last = prompt[-1]
    assert consumed(tok, history, KVEnd(back=last)) == prompt[:-1]
    with pytest.raises(TemplateError):
        consumed(tok, history, KVEnd(back="not the end"))


def test_bounded_context_keeps_system_and_last_exchange():
    long = "x" * (3 * CONTEXT_CHARS) + "END"
    history = [SYSTEM, user("a"), assistant("b"), user(long), user("c")]
    ctx = bounded_context(history)
    assert [m["role"] for m in ctx] == ["system", "user", "user"]
    assert ctx[1]["content"].endswith("END") and len(ctx[1]["content"]) == CONTEXT_CHARS
    assert bounded_context([user("a"), assistant("b"), user("c")]) == [user("c")]
    assert bounded_context([SYSTEM, user("a")]) == [SYSTEM, user("a")]


def _turn(tok, reply: str):
    history = CONVERSATION[:2]
    text = render(tok, history)
    return text, encode(tok, text), continuation(tok, history, reply)


def test_settle_keeps_a_canonical_reply_and_resends_the_unfed_last_token(tokenizer):
    reply = "I am a poet of the sea."
    text, tokens, after = _turn(tokenizer, reply)
    generated = encode(tokenizer, text + reply)[len(tokens) :]
    s = settle(tokenizer, text, tokens, generated[:-1], after, max_trim=100)
    assert s.trim == 0 and s.end == KVEnd(ahead=reply[: len(reply) - len(tokenizer.decode(generated[-1:]))])


def test_settle_drops_text_the_conversation_does_not_hold(tokenizer):
    """A stop string cut the reply short, but the KV already holds the tokens that made it."""
    reply = "I am a poet"
    text, tokens, after = _turn(tokenizer, reply)
    fed = encode(tokenizer, text + reply + " STOP here")[len(tokens) :]
    s = settle(tokenizer, text, tokens, fed, after, max_trim=100)
    assert s.end == KVEnd(ahead=reply) and s.trim == len(fed) - len(encode(tokenizer, reply))


def test_settle_retokenizes_across_the_prompt_boundary(tokenizer):
    """Llama-3's prompt ends with '\\n\\n', one token alone but two once a reply follows: the KV steps back
    into the prompt so that the next delta re-sends it with the reply, tokenized as the whole would be."""
    tok = with_template(tokenizer, TEMPLATES["llama3"])
    reply = "Hello."
    text, tokens, after = _turn(tok, reply)
    fed = encode(tok, reply)
    s = settle(tok, text, tokens, fed, after, max_trim=100)
    assert s.end == KVEnd(back="\n\n") and s.trim == 1 + len(fed)
    assert encode(tok, text[:-2]) + encode(tok, "\n\n" + after) == encode(tok, text + after)


def test_settle_follows_a_template_that_trims_replies(tokenizer):
    tok = with_template(tokenizer, TEMPLATES["llama2"])
    reply = "I am a poet.\n"
    text, tokens, after = _turn(tok, reply)
    assert after is not None and after.startswith(" I am a poet. ")
    fed = encode(tok, reply)
    s = settle(tok, text, tokens, fed, after, max_trim=100)
    assert s.trim == len(fed) and s.end == KVEnd()


def test_settle_never_trims_more_than_allowed(tokenizer):
    tok = with_template(tokenizer, TEMPLATES["llama2"])
    text, tokens, after = _turn(tok, "x.\n")
    fed = encode(tok, "x.\n")
    assert settle(tok, text, tokens, fed, after, max_trim=0).trim == 0


def test_system_head_is_the_render_up_to_the_first_user_content(tokenizer):
    for name, template in TEMPLATES.items():
        tok = with_template(tokenizer, template)
        head = system_head(tok, CONVERSATION[:2])
        assert render(tok, CONVERSATION[:2]).startswith(head) and "You are a poet." in head, name
        assert "Hello!" not in head
    assert "SmolLM" in system_head(tokenizer, [user("hi")])  # ChatML injects a default system prompt
    for name in ("llama2", "llama3", "mistral"):
        assert system_head(with_template(tokenizer, TEMPLATES[name]), [user("hi")]) == "", name


def test_a_template_that_rerenders_earlier_turns_has_no_delta(tokenizer):
    tok = with_template(tokenizer, SYSTEM_LAST)
    with pytest.raises(TemplateError):
        turn_delta(tok, CONVERSATION[:2], "I am a poet.", KVEnd(ahead="I am a poet."), [user("More.")])


def test_template_errors_are_template_errors(tokenizer):
    tok = with_template(tokenizer, TEMPLATES["llama2"])
    with pytest.raises(TemplateError):
        render(tok, [user("a"), user("b")])
    assert continuation(tok, [user("a"), assistant("b")], "c") is None
