"""`streamllm chat`: a terminal conversation over the OpenAI SDK, streaming tokens as they come.

Each run keeps one server-side session (`--session`, or a new random id), so every turn sends only
the new user message: the server holds the rest. `/reset` starts a new session, `/stats` shows what
the server keeps for this one, `/quit` ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any, TextIO

import httpx

GROUP = None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with a running server")
    p.add_argument("--base-url", default=os.environ.get("STREAMLLM_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("STREAMLLM_API_KEY", "none"))
    p.add_argument("--session", help="continue this session id (default: a new one)")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--system", help="system prompt for a new session")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(func=run)


def new_session_id() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


class Chat:
    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
        from openai import OpenAI

        self.args, self.out = args, out
        self.base = args.base_url.rstrip("/")
        self.client = OpenAI(base_url=f"{self.base}/v1", api_key=args.api_key)
        self.model = args.model or self.client.models.list().data[0].id
        self.session = args.session or new_session_id()
        self.fresh = args.session is None

    def send(self, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        if self.fresh and self.args.system:
            messages.insert(0, {"role": "system", "content": self.args.system})
        stream: Any = self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            max_tokens=self.args.max_tokens,
            temperature=self.args.temperature,
            extra_body={"session_id": self.session},
        )
        reply = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                piece = chunk.choices[0].delta.content
                reply.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        self.fresh = False
        return "".join(reply)

    def stats(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.args.api_key}"}
        r = httpx.get(f"{self.base}/v1/sessions/{self.session}", headers=headers, timeout=10)
        return dict(r.json())

    def handle(self, line: str) -> bool:
        """One input line; False ends the chat."""
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.session, self.fresh = new_session_id(), True
            self.out.write(f"[new session {self.session}]\n")
        elif cmd == "/stats":
            for key, value in self.stats().items():
                self.out.write(f"  {key}: {value}\n")
        elif cmd:
            self.send(cmd)
        return True


def run(args: argparse.Namespace) -> int:
    chat = Chat(args)
    print(f"[{chat.model} at {chat.base}; session {chat.session}; /reset /stats /quit]")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not chat.handle(line):
            return 0
