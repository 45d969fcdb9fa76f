"""Soak clients: each runs one multi-turn conversation at a time over httpx and records every request.

Turn accounting (what the lost-turn check compares with the session's `turns`):
- acked: the client saw a chunk with finish_reason 'stop' or 'length' (a JSON answer: a 200 with one).
  The server commits a turn before it sends that chunk, so every acked turn must be in `turns`.
- disconnected: the client closed the stream after 1-3 content deltas of a turn asked for 64 tokens with
  ignore_eos, so the turn is far from done; the server must abort it and commit nothing.
- in doubt: the request reached a server and failed there (5xx, an error event, a broken stream, a client
  timeout): its commit may or may not have landed (e.g. Redis applied it after the reply was lost).
- refused (4xx, connection refused): never reached the session; counts nothing.
So per session acked <= turns <= acked + in doubt: fewer is a lost turn, more is a phantom turn.
A failed turn is dropped from the client's history; its next turn carries a new user message.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .cluster import Cluster

PROMPTS = [
    "Tell me about lighthouses.",
    "What is a good name for a cat?",
    "Summarise what we said so far.",
    "Give me one fact about the moon.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "What should I cook tonight?",
]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
STYLES = ("full-stream", "full-stream", "delta-stream", "full-json")
"""Resend the whole history and stream (most clients, as OpenAI clients do), send only the new turn, or
wait for one JSON answer."""
SERVER_FAILURES = ("5", "error-event", "broken-stream", "connect-error", "timeout")
"""Outcome prefixes that are the server's failures: allowed only inside declared outages."""


@dataclass
class RunContext:
    """What every client shares: the clock (seconds since the start), the plan, the failover marks."""

    run_id: str
    seed: int
    faults: set[str]
    t0: float
    stop_at: float
    """No new turn starts after this (seconds since t0)."""
    settle: float
    """Seconds after stop_at that retries (of deletes) and the final checks may still use."""
    down_until: dict[int, float] = field(default_factory=dict)
    """Replica index -> until when a client that found it refusing connections skips it."""

    def now(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Attempt:
    client: int
    session: str
    kind: str
    replica: int
    start: float
    end: float = 0.0
    outcome: str = ""
    """HTTP status, 'error-event:<code>', 'broken-stream', 'connect-error', 'timeout' or 'disconnect'."""
    answered: float | None = None
    """When the response headers arrived (a stream's come with its first event)."""
    acked: bool = False
    retry_after: str | None = None
    bad_error_body: bool = False
    """A non-2xx answer or error event whose body is not OpenAI's {"error": {...}}."""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def server_failure(self) -> bool:
        return self.outcome.startswith(SERVER_FAILURES)


@dataclass
class Conversation:
    id: str
    style: str
    history: list[dict[str, str]] = field(default_factory=list)
    acked: int = 0
    in_doubt: int = 0
    disconnects: int = 0
    deleted: bool | None = False
    """True: a DELETE was answered 200 (or 404 after an attempt that may have landed); None: unknown."""
    lost_before_delete: int = 0
    """Acked turns of a session that DELETE found missing (404 on the first attempt)."""


def error_body_ok(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


class SoakClient:
    def __init__(
        self, index: int, cluster: Cluster, model: str, ctx: RunContext, http: httpx.AsyncClient
    ) -> None:
        self.index, self.cluster, self.model, self.ctx, self.http = index, cluster, model, ctx, http
        self.rng = random.Random(ctx.seed * 1000 + index)
        self.conversations: list[Conversation] = []
        self.attempts: list[Attempt] = []
        self.home = index % cluster.size

    def new_conversation(self) -> Conversation:
        conv = Conversation(f"soak-{self.ctx.run_id}-c{self.index}-{len(self.conversations)}", "")
        conv.style = STYLES[(self.index + len(self.conversations)) % len(STYLES)]
        if self.rng.random() < 0.5:
            conv.history.append(SYSTEM)
        self.conversations.append(conv)
        return conv

    async def run(self) -> None:
        conv = self.new_conversation()
        while self.ctx.now() < self.ctx.stop_at:
            roll = self.rng.random()
            if "delete" in self.ctx.faults and conv.acked >= 2 and roll < 0.08:
                await self.delete(conv)
                conv = self.new_conversation()
                continue
            disconnect = "disconnect" in self.ctx.faults and roll > 0.88
            attempt = await self.turn(conv, disconnect)
            await asyncio.sleep(self.pause(attempt))

    def pause(self, a: Attempt) -> float:
        if a.outcome == "200" or a.outcome == "disconnect":
            return self.rng.uniform(0.0, 0.3)
        if a.outcome == "503" and a.retry_after:
            try:
                return min(float(a.retry_after), 3.0)
            except ValueError:
                return 1.0
        return 0.0 if a.outcome == "connect-error" else 0.5

    def base_url(self, attempt: Attempt) -> str | None:
        """The client's home replica, else the next one that is up (as a load balancer would route)."""
        for k in range(self.cluster.size):
            i = (self.home + k) % self.cluster.size
            url = self.cluster.url(i)
            if url is not None and not (k == 0 and self.ctx.now() < self.ctx.down_until.get(i, 0.0)):
                attempt.replica = i
                return url
        return None

    def _attempt(self, conv: Conversation, kind: str) -> Attempt:
        a = Attempt(self.index, conv.id, kind, self.home, self.ctx.now())
        self.attempts.append(a)
        return a

    async def turn(self, conv: Conversation, disconnect: bool = False, probe: bool = False) -> Attempt:
        a = self._attempt(conv, "probe" if probe else "disconnect" if disconnect else conv.style)
        stream = disconnect or conv.style != "full-json"
        user = {"role": "user", "content": f"{self.rng.choice(PROMPTS)} ({len(self.attempts)})"}
        delta = conv.style == "delta-stream" or probe
        messages = [user] if delta and conv.acked else [*conv.history, user]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": 64 if disconnect else 1 if probe else self.rng.randint(4, 16),
            "temperature": 0.7,
            "seed": self.rng.randrange(1 << 30),
            "session_id": conv.id,
            "session_mode": "delta" if delta and conv.acked else "auto",
            "stream": stream,
        }
        if disconnect:
            body["ignore_eos"] = True
        reply = await self._send(a, body, cut_after=self.rng.randint(1, 3) if disconnect else None)
        if a.acked:
            conv.acked += 1
            conv.history += [user, {"role": "assistant", "content": reply}]
        elif a.outcome == "disconnect":
            conv.disconnects += 1
        elif a.server_failure and a.outcome != "connect-error":
            conv.in_doubt += 1
        return a

    async def _send(self, a: Attempt, body: dict[str, Any], cut_after: int | None) -> str:
        """POST the turn; fills in the attempt and returns the reply text (complete only when acked)."""
        url = self.base_url(a)
        reply, sent = "", time.monotonic()
        try:
            if url is None:
                raise httpx.ConnectError("no replica is up")
            async with self.http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                a.outcome, a.answered = str(r.status_code), self.ctx.now()
                if r.status_code != 200:
                    await self._refusal(a, r)
                elif body["stream"]:
                    reply = await self._read_stream(a, r, cut_after, sent)
                else:
                    data = json.loads(await r.aread())
                    reply = data["choices"][0]["message"]["content"]
                    a.acked = data["choices"][0]["finish_reason"] in ("stop", "length")
        except httpx.ConnectError:
            a.outcome = "connect-error"
            self.ctx.down_until[a.replica] = self.ctx.now() + 1.0
        except httpx.TimeoutException:
            a.outcome = "timeout"
        except (httpx.TransportError, json.JSONDecodeError):
            a.outcome = "broken-stream"
        a.end = self.ctx.now()
        return reply

    async def _refusal(self, a: Attempt, r: httpx.Response) -> None:
        a.retry_after = r.headers.get("retry-after")
        try:
            a.bad_error_body = not error_body_ok(json.loads(await r.aread()))
        except ValueError:
            a.bad_error_body = True

    async def _read_stream(self, a: Attempt, r: httpx.Response, cut_after: int | None, sent: float) -> str:
        last, deltas = 0.0, 0
        text: list[str] = []
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                a.outcome = f"error-event:{(event.get('error') or {}).get('code')}"
                a.bad_error_body = not error_body_ok(event)
                a.acked = False
                return "".join(text)
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.monotonic()
                    if deltas:
                        a.itl.append(now - last)
                    else:
                        a.ttft = now - sent
                    last, deltas = now, deltas + 1
                    text.append(content)
                if choice.get("finish_reason") in ("stop", "length"):
                    a.acked = True
            if cut_after is not None and deltas >= cut_after and not a.acked:
                a.outcome = "disconnect"
                return "".join(text)
        if not a.acked:
            a.outcome = "broken-stream"
        return "".join(text)

    async def delete(self, conv: Conversation) -> None:
        """DELETE the session until an answer says it is gone (or the run ends: then it is unknown)."""
        maybe_applied = False
        conv.deleted = None
        while self.ctx.now() < self.ctx.stop_at:
            a = self._attempt(conv, "delete")
            url = self.base_url(a)
            try:
                if url is None:
                    raise httpx.ConnectError("no replica is up")
                r = await self.http.delete(f"{url}/v1/sessions/{conv.id}")
                a.outcome, a.answered = str(r.status_code), self.ctx.now()
                if r.status_code != 200:
                    await self._refusal(a, r)
            except httpx.ConnectError:
                a.outcome = "connect-error"
            except httpx.TimeoutException:
                a.outcome = "timeout"
            except httpx.TransportError:
                a.outcome = "broken-stream"
            a.end = self.ctx.now()
            if a.outcome in ("200", "404"):
                if a.outcome == "404" and not maybe_applied:
                    conv.lost_before_delete = conv.acked
                conv.deleted = True
                return
            maybe_applied = maybe_applied or (a.server_failure and a.outcome != "connect-error")
            await asyncio.sleep(self.pause(a))
