"""`streamllm bench multiturn`: one long conversation through the HTTP API, session vs stateless.

Both modes resend the full history each turn, as OpenAI clients do. With a session the server checks
the history against what it holds and prefills only the new turn; without one it prefills everything but
the head its prefix reuse finds in a slot (the previous request's, while the history fits the cache and
that slot was not reused). Each mode opens with a system message of its own, so that neither copies the
other's history. Per turn we record the time to first token (client side, streaming), the prompt's
tokens and those the server prefilled (usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens).
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from streaming_core.report import new_figure, print_json, print_table, save_figure

from .local import local_server

GROUP = "bench"
BOOKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "books"
BOOK = BOOKS / "pride_and_prejudice.txt"
QUESTIONS = ("In one sentence, who is mentioned here?",)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("multiturn", help="TTFT and prefill per turn: session vs stateless resend")
    p.add_argument("--base-url", help="a running server (default: start one locally)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=24, help="reply length per turn")
    p.add_argument("--words", type=int, default=60, help="words of book text in each user message")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of TTFT per turn")
    p.set_defaults(func=run)


def user_messages(
    turns: int,
    words: int,
    books: tuple[Path, ...] = (BOOK,),
    questions: tuple[str, ...] = QUESTIONS,
    interleave: bool = False,
) -> list[str]:
    """Consecutive passages of public-domain books (read as one text, from the start again at its end),
    each followed by a question about it, the questions in turn. `interleave`: turn i reads the next
    passage of book i mod len(books) instead, so that any run of turns mixes the books (and their token
    counts per word: Finnish takes ~2.5x English's) alike."""
    texts = [book.read_text(encoding="utf-8").split() for book in books if book.exists()]
    texts = [text for text in texts if text] or [["streaming"] * words]
    if not interleave:
        texts = [[w for text in texts for w in text]]
    passages = []
    for i in range(turns):
        text = texts[i % len(texts)]
        first = 1000 % len(text) + (i // len(texts)) * words
        passage = " ".join(text[j % len(text)] for j in range(first, first + words))
        passages.append(f"{passage}\n{questions[i % len(questions)]}")
    return passages


def converse(
    client: Any, model: str, prompts: list[str], session: str | None, max_tokens: int
) -> dict[str, list]:
    label = f"session {session}" if session else f"stateless {uuid.uuid4().hex[:8]}"
    history = [{"role": "system", "content": f"You answer questions about a book ({label})."}]
    ttft: list[float] = []
    prompt_tokens: list[int] = []
    prefill: list[int] = []
    extra = {"session_id": session} if session else {}
    for prompt in tqdm(prompts, desc="session" if session else "stateless", leave=False):
        history.append({"role": "user", "content": prompt})
        start = time.perf_counter()
        first: float | None = None
        reply: list[str] = []
        usage = None
        stream = client.chat.completions.create(
            model=model,
            messages=history,
            stream=True,
            max_tokens=max_tokens,
            temperature=0,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                reply.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        ttft.append((first or time.perf_counter()) - start)
        assert usage is not None, "the server sent no usage chunk"
        details = usage.prompt_tokens_details
        cached = details.cached_tokens if details and details.cached_tokens else 0
        prompt_tokens.append(usage.prompt_tokens)
        prefill.append(usage.prompt_tokens - cached)
        history.append({"role": "assistant", "content": "".join(reply)})
    return {"ttft_s": ttft, "prompt_tokens": prompt_tokens, "prefill_tokens": prefill}


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    prompts = user_messages(args.turns, args.words)
    with local_server(args.base_url) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=args.api_key, timeout=600)
        model = client.models.list().data[0].id
        results: dict[str, Any] = {
            "session": converse(client, model, prompts, f"bench-{uuid.uuid4().hex[:8]}", args.max_tokens),
            "stateless": converse(client, model, prompts, None, args.max_tokens),
        }
    s, n = results["session"], results["stateless"]
    rows = [
        (t + 1, s["ttft_s"][t] * 1000, s["prefill_tokens"][t], n["ttft_s"][t] * 1000, n["prefill_tokens"][t])
        for t in range(args.turns)
    ]
    cols = ["turn", "session TTFT ms", "session prefill", "stateless TTFT ms", "stateless prefill"]
    ratio = s["ttft_s"][-1] / s["ttft_s"][1] if args.turns > 1 else float("nan")
    caption = f"{model}; session TTFT turn {args.turns} / turn 2 = {ratio:.2f}"
    print_table("multi-turn conversation over HTTP", cols, rows, caption)
    results["session_ttft_last_over_turn2"] = ratio
    if args.plot:
        fig, (ax, bx) = new_figure(2)
        turns = list(range(1, args.turns + 1))
        for mode in ("session", "stateless"):
            ax.plot(turns, [x * 1000 for x in results[mode]["ttft_s"]], marker="o", label=mode)
            bx.plot(turns, results[mode]["prefill_tokens"], marker="o", label=mode)
        ax.set(xlabel="turn", ylabel="time to first token (ms)", title="TTFT per turn")
        bx.set(xlabel="turn", ylabel="tokens prefilled", title="Prefill per turn")
        ax.legend()
        bx.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(results)
    return 0
