"""What a StreamEval stream is fed into: one engine session, the recompute baseline, or the HTTP API.

Engine backends keep the whole stream in one session, the way a server keeps a conversation: each turn
prefills only its own tokens, then generates; the reply's tokens enter the KV (all but the last, which
the engine feeds only if generation goes on), so the stream holds the model's own answers as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import CacheConfig, EngineConfig
from ..engine import Engine
from ..models import DecoderModel
from ..sampler import SamplingParams
from .streameval import StreamFull

SESSION = "streameval"


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: list[int]


class Renderer:
    """Turns user texts into the text appended to the stream: as is (raw), or the chat template's delta.

    The chat delta is the full conversation rendered with the tokenizer's template, minus what was
    rendered before (the previous prompt plus the assistant's reply): the templates we serve render a
    conversation as a prefix of its continuation, and one that does not is refused.
    """

    def __init__(self, tokenizer: Any, fmt: str) -> None:
        self.tokenizer, self.fmt = tokenizer, fmt
        self.messages: list[dict[str, str]] = []
        self.rendered = ""

    def delta(self, user: str) -> str:
        if self.fmt == "raw":
            return user
        self.messages.append({"role": "user", "content": user})
        full: str = self.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(self.rendered):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation"
            )
        new, self.rendered = full[len(self.rendered) :], full
        return new

    def replied(self, text: str) -> None:
        if self.fmt == "chat":
            self.messages.append({"role": "assistant", "content": text})
            self.rendered += text


@dataclass
class EngineStream:
    """One engine, one slot; `limit` refuses a turn that would take the stream past it (dense)."""

    model: DecoderModel
    tokenizer: Any
    eos: set[int]
    cache: CacheConfig
    params: SamplingParams
    fmt: str
    limit: int | None = None
    tokens: int = 0
    engine: Engine = field(init=False)
    render: Renderer = field(init=False)

    def __post_init__(self) -> None:
        cache = CacheConfig(self.cache.sink_tokens, self.cache.window, num_slots=1, host_budget_bytes=0)
        self.engine = Engine(self.model, self.tokenizer, EngineConfig(cache=cache), self.eos)
        self.render = Renderer(self.tokenizer, self.fmt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.tokens == 0)["input_ids"])

    def generate(self, session: str | None, tokens: list[int]) -> Reply:
        handle = self.engine.submit(session, tokens, self.params)
        self.engine.run_until_done(handle)
        events = list(handle.stream)
        if events[-1].finish_reason in ("error", "abort"):
            raise RuntimeError(
                f"the engine ended the turn with {events[-1].error or events[-1].finish_reason}"
            )
        return Reply("".join(e.text for e in events), [e.token for e in events if e.token is not None])

    def ask(self, text: str) -> str:
        tokens = self.encode(self.render.delta(text))
        if self.limit is not None and self.tokens + len(tokens) + self.params.max_tokens > self.limit:
            raise StreamFull
        reply = self.generate(SESSION, tokens)
        stats = self.engine.stats(SESSION)
        assert stats is not None
        self.tokens = stats.tokens_seen
        self.render.replied(reply.text)
        return reply.text


@dataclass
class RecomputeStream(EngineStream):
    """Sliding window with re-computation: each query re-prefills, from an empty cache, the last tokens
    of the stream that leave room for the reply in `cache.capacity` (no sinks, nothing evicted)."""

    history: list[int] = field(default_factory=list)

    def ask(self, text: str) -> str:
        self.history += self.encode(self.render.delta(text))
        keep = self.cache.capacity - self.params.max_tokens
        if keep < 1:
            raise ValueError(
                f"a cache of {self.cache.capacity} leaves no room for {self.params.max_tokens} reply tokens"
            )
        reply = self.generate(None, self.history[-keep:])
        self.history += reply.tokens[:-1]  # as the streaming modes hold it
        self.tokens = len(self.history)
        self.render.replied(reply.text)
        return reply.text


class HttpStream:
    """The whole stream as one session of a running server: raw text through /v1/completions (the
    session appends it), chat through /v1/chat/completions with `session_mode: delta`."""

    def __init__(self, base_url: str, api_key: str, params: SamplingParams, fmt: str, session: str) -> None:
        import httpx
        from openai import OpenAI

        self.base = f"{base_url.rstrip('/')}/v1"
        self.client = OpenAI(base_url=self.base, api_key=api_key, timeout=600)
        self.http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
        self.model = self.client.models.list().data[0].id
        self.params, self.fmt, self.session = params, fmt, session
        self.tokens = 0

    def ask(self, text: str) -> str:
        common: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.params.max_tokens,
            "temperature": 0,
            "stop": list(self.params.stop) or None,
            "extra_body": {"session_id": self.session},
        }
        if self.fmt == "raw":
            done = self.client.completions.create(prompt=text, **common)
            reply = done.choices[0].text
        else:
            common["extra_body"]["session_mode"] = "delta"
            chat = self.client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
            reply = chat.choices[0].message.content or ""
        # the session's own count: what it consumed, evicted tokens included
        info = self.http.get(f"{self.base}/sessions/{self.session}")
        info.raise_for_status()
        self.tokens = int(info.json()["tokens_seen"])
        return reply
