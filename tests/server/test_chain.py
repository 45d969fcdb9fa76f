"""The message hash chain: canonical, order-sensitive, resumable, and content parts count as their text."""

from __future__ import annotations

import hashlib

import pytest

from server.conversation.chain import canonical, chain, content_text, link, normalize
from server.conversation.errors import ConversationError

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo"},
    {"role": "assistant", "content": "Hi!"},
]


def test_definition():
    h1 = hashlib.sha256(b'{"content":"Be brief.","role":"system"}').hexdigest()
    assert chain(MSGS)[0] == h1
    assert chain(MSGS)[1] == hashlib.sha256((h1 + canonical(MSGS[1])).encode()).hexdigest()
    assert canonical(MSGS[1]) == '{"content":"Héllo","role":"user"}'
    assert all(len(h) == 64 for h in chain(MSGS))


def test_resumes_from_any_hash():
    whole = chain(MSGS)
    assert chain(MSGS[1:], start=whole[0]) == whole[1:]
    assert link(whole[1], MSGS[2]) == whole[2]
    assert chain([]) == []


def test_sensitive_to_order_role_and_content():
    base = chain(MSGS)[-1]
    assert chain([MSGS[0], MSGS[2], MSGS[1]])[-1] != base
    assert chain([MSGS[0], {"role": "assistant", "content": "Héllo"}, MSGS[2]])[-1] != base
    assert chain([MSGS[0], {"role": "user", "content": "Hello"}, MSGS[2]])[-1] != base


def test_normalize_content_parts_and_extra_fields():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert content_text(parts) == "a\nb"
    assert content_text(None) == ""
    got = normalize([{"role": "user", "content": parts, "name": "x"}, {"role": "assistant", "content": None}])
    assert got == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}]
    assert chain(got) == chain([{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}])


@pytest.mark.parametrize(
    "bad",
    [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [{"content": "x"}]],
)
def test_normalize_rejects_what_it_cannot_hash(bad):
    with pytest.raises(ConversationError) as e:
        normalize(bad)
    assert e.value.status == 400
