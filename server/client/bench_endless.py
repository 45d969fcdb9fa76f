"""`streamllm bench endless`: one conversation of thousands of turns through the HTTP API, delta mode.

Each turn sends only its new user message (a book passage and a question; `session_mode: delta`; turn i
reads book i mod 3, so that the first and the last span of turns carry the same mix of text) and
streams a short greedy reply. Per turn: time to first token and the gaps between content chunks (ITL),
the usage counts, the reply's tokens (logprobs) to spot degenerate replies (empty, or one token
repeated). Every `--rss-every` turns: the server's resident memory (from /proc for a server this
command started, from `process_resident_memory_bytes` in /metrics otherwise). At the end the session's
counters are checked against what the turns reported; the command fails (exit 1) if they disagree.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
import uuid
from statistics import quantiles
from typing import Any

import httpx
from tqdm import tqdm

from streaming_core.report import new_figure, print_json, print_table, save_figure

from .bench_multiturn import BOOKS, user_messages
from .local import local_server_proc, rss_mb

GROUP = "bench"
QUESTIONS = (
    "Who is speaking here? One sentence.",
    "What happens in this passage? One sentence.",
    "Name one person or place mentioned above.",
    "What is the mood of this passage, in a few words?",
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "endless", help="one conversation of thousands of delta turns: latency, memory, replies"
    )
    p.add_argument("--base-url", help="a running server (default: start one locally)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--turns", type=int, default=2000)
    p.add_argument("--words", type=int, default=70, help="words of book text in each user message")
    p.add_argument("--max-tokens", type=int, default=12, help="reply length per turn")
    p.add_argument(
        "--span", type=int, default=100, help="turns per row of the table (and compared first/last)"
    )
    p.add_argument("--rss-every", type=int, default=10, help="sample the server's memory every N turns")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of latency, memory and degenerate replies per turn")
    p.set_defaults(func=run)


def turn(client: Any, model: str, session: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    tokens: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": session, "session_mode": "delta"},
    )
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta.content:
                stamps.append(time.perf_counter())
                text.append(choice.delta.content)
            if choice.logprobs and choice.logprobs.content:
                tokens += [t.token for t in choice.logprobs.content]
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None, "the server sent no usage chunk"
    details = usage.prompt_tokens_details
    reply = "".join(text)
    return {
        "ttft_s": (stamps[0] if stamps else time.perf_counter()) - start,
        "itl_s": [b - a for a, b in itertools.pairwise(stamps)],
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": details.cached_tokens if details and details.cached_tokens else 0,
        "completion_tokens": usage.completion_tokens,
        "degenerate": degenerate(reply, tokens),
    }


def degenerate(reply: str, tokens: list[str]) -> bool:
    """An empty reply, or one whose tokens are a single token repeated."""
    return not reply.strip() or (len(tokens) > 1 and len(set(tokens)) == 1)


def metrics_rss_mb(base_url: str) -> float | None:
    """The server's own `process_resident_memory_bytes` (prometheus_client's process collector)."""
    try:
        body = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^process_resident_memory_bytes\s+(\S+)", body, re.MULTILINE)
    return float(match.group(1)) / 2**20 if match else None


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return quantiles(values, n=100, method="inclusive")[98]


def p50(values: list[float]) -> float:
    return quantiles(values, n=2, method="inclusive")[0] if len(values) > 1 else (values or [float("nan")])[0]


def spans(turns: list[dict[str, Any]], rss: list[tuple[int, float]], size: int) -> list[dict[str, Any]]:
    """Per run of `size` turns: TTFT and ITL percentiles, degenerate share, stream length, last RSS."""
    out = []
    for first in range(0, len(turns), size):
        part = turns[first : first + size]
        itl = [g for t in part for g in t["itl_s"]]
        ttft = [t["ttft_s"] for t in part]
        last_rss = [mb for n, mb in rss if n <= first + len(part)]
        out.append(
            {
                "turns": f"{first + 1}-{first + len(part)}",
                "stream_tokens": part[-1]["prompt_tokens"] + part[-1]["completion_tokens"],
                "ttft_p50_ms": p50(ttft) * 1000,
                "ttft_p99_ms": p99(ttft) * 1000,
                "itl_p50_ms": p50(itl) * 1000,
                "itl_p99_ms": p99(itl) * 1000,
                "degenerate": sum(t["degenerate"] for t in part) / len(part),
                "rss_mb": last_rss[-1] if last_rss else float("nan"),
            }
        )
    return out


def counter_checks(turns: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, bool]:
    """What the session reports must agree with what its turns reported.

    A turn's cached_tokens is what the session held before it; the session then holds that turn's
    prompt and all but possibly the last reply token (the engine feeds a sampled token only if
    generation goes on, and the server may trim a reply's tail to the conversation's tokenization)."""

    def held_after(t: dict[str, Any], held: int) -> bool:
        return t["prompt_tokens"] - 1 <= held <= t["prompt_tokens"] + t["completion_tokens"]

    pairs = itertools.pairwise(turns)
    return {
        "turns": info["turns"] == len(turns),
        "every_turn_cached": all(t["cached_tokens"] > 0 for t in turns[1:]),
        "cached_follows_previous_turn": all(held_after(a, b["cached_tokens"]) for a, b in pairs),
        "tokens_seen_follows_last_turn": held_after(turns[-1], info["tokens_seen"]),
        "cache_full": info["cache_tokens"] == info["sink_tokens"] + info["window"],
        "no_rebuilds": info.get("rebuilds", 0) == 0,
    }


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    books = tuple(sorted(BOOKS.glob("*.txt")))
    prompts = user_messages(args.turns, args.words, books, QUESTIONS, interleave=True)
    session = f"endless-{uuid.uuid4().hex[:8]}"
    turns: list[dict[str, Any]] = []
    rss: list[tuple[int, float]] = []
    started = time.perf_counter()
    with local_server_proc(args.base_url) as (url, proc):
        client = OpenAI(base_url=f"{url}/v1", api_key=args.api_key, timeout=600)
        model = client.models.list().data[0].id

        def sample(n: int) -> None:
            mb = rss_mb(proc.pid) if proc is not None else metrics_rss_mb(url)
            if mb is not None:
                rss.append((n, mb))

        sample(0)
        for i, prompt in enumerate(tqdm(prompts, desc="endless", unit="turn")):
            turns.append(turn(client, model, session, prompt, args.max_tokens))
            if (i + 1) % args.rss_every == 0 or i + 1 == len(prompts):
                sample(i + 1)
        headers = {"Authorization": f"Bearer {args.api_key}"}
        info = httpx.get(f"{url}/v1/sessions/{session}", headers=headers, timeout=30).json()
    seconds = time.perf_counter() - started
    rows = spans(turns, rss, args.span)
    checks = counter_checks(turns, info)
    first, last = rows[0], rows[-1]
    result = {
        "model": model,
        "turns": len(turns),
        "seconds": seconds,
        "stream_tokens": info["tokens_seen"],
        "session": {
            k: info[k] for k in ("turns", "tokens_seen", "cache_tokens", "evicted", "sink_tokens", "window")
        },
        "ttft_p99_last_over_first": last["ttft_p99_ms"] / first["ttft_p99_ms"],
        "itl_p99_last_over_first": last["itl_p99_ms"] / first["itl_p99_ms"],
        "rss_mb_first": rss[0][1] if rss else None,
        "rss_mb_last": rss[-1][1] if rss else None,
        "degenerate_share": sum(t["degenerate"] for t in turns) / len(turns),
        "counters": checks,
        "spans": rows,
        "rss": rss,
        "ttft_s": [t["ttft_s"] for t in turns],
    }
    print_endless(result, args)
    if args.plot:
        save_figure(plot_endless(result, args.span), args.plot)
    if args.json:
        print_json(result)
    return 0 if all(checks.values()) else 1


def print_endless(result: dict[str, Any], args: argparse.Namespace) -> None:
    cols = [
        "turns",
        "stream tokens",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "degenerate",
        "RSS MB",
    ]
    rows = [list(r.values()) for r in result["spans"]]
    caption = (
        f"{result['model']}, {args.words}-word turns, {args.max_tokens}-token replies, {result['seconds']:.0f} s; "
        f"p99 last/first span: TTFT {result['ttft_p99_last_over_first']:.2f}x, "
        f"ITL {result['itl_p99_last_over_first']:.2f}x; counters "
        + ("consistent" if all(result["counters"].values()) else f"INCONSISTENT {result['counters']}")
    )
    print_table(f"one conversation, {result['turns']} delta turns over HTTP", cols, rows, caption)


def plot_endless(result: dict[str, Any], span: int) -> Any:
    fig, (ax, bx, cx) = new_figure(3, width=5.5)
    turns = range(1, len(result["ttft_s"]) + 1)
    ax.plot(turns, [t * 1000 for t in result["ttft_s"]], ".", markersize=2, alpha=0.4, label="TTFT per turn")
    mids = [span * i + span / 2 for i in range(len(result["spans"]))]
    for key, style in (("ttft_p99_ms", "o-"), ("itl_p99_ms", "s-"), ("itl_p50_ms", "^-")):
        ax.plot(mids, [r[key] for r in result["spans"]], style, label=f"{key[:-3]} per {span} turns")
    ax.set(xlabel="turn", ylabel="ms", title="Latency over the conversation", yscale="log")
    ax.legend(fontsize=7)
    bx.plot([n for n, _ in result["rss"]], [mb for _, mb in result["rss"]], marker=".")
    bx.set(xlabel="turn", ylabel="server RSS (MB)", title="Server memory")
    cx.bar(mids, [r["degenerate"] * 100 for r in result["spans"]], width=span * 0.8)
    cx.set(xlabel="turn", ylabel="% of replies", title=f"Degenerate replies per {span} turns")
    cx.set_ylim(0, max(5.0, *(r["degenerate"] * 110 for r in result["spans"])))
    return fig
