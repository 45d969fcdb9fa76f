"""`streamllm bench serve`: concurrent streaming clients over HTTP at several concurrency levels.

Each level runs `concurrency` clients at once, each streaming one completion of exactly --max-tokens
tokens (ignore_eos); aggregate tok/s is all tokens over the wall time of the level, TTFT and
inter-token latency are per client, reported at p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from typing import Any

from tqdm import tqdm

from streaming_core.report import new_figure, print_json, print_table, save_figure

from .local import local_server

GROUP = "bench"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="concurrent streaming clients: throughput, TTFT and ITL percentiles")
    p.add_argument("--base-url", help="a running server (default: start one locally)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as in the peer comparison")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of throughput and latency against concurrency")
    p.set_defaults(func=run)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_client(client: Any, model: str, i: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    """One streamed chat completion; tokens counted from the usage chunk when the server sends one
    (any OpenAI-compatible server: llama.cpp's included), else one per content chunk."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me a long story about lighthouse number {i}."}],
        stream=True,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=i,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft": stamps[0] - start if stamps else float("nan"),
        "itl": gaps,
        "tokens": tokens if tokens is not None else len(stamps),
    }


async def level(
    url: str, api_key: str, model: str, n: int, max_tokens: int, temperature: float = 0.0
) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=600, max_retries=0)
    start = time.perf_counter()
    runs = await asyncio.gather(*(one_client(client, model, i, max_tokens, temperature) for i in range(n)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in runs]
    itl = [g for r in runs for g in r["itl"]]
    return {
        "tok_per_s": sum(r["tokens"] for r in runs) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99),
        "wall_s": wall,
    }


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {}
    with local_server(args.base_url) as url:
        model = OpenAI(base_url=f"{url}/v1", api_key=args.api_key).models.list().data[0].id
        asyncio.run(level(url, args.api_key, model, 1, 8))  # warm-up
        for n in tqdm(levels, desc="concurrency"):
            results[str(n)] = asyncio.run(
                level(url, args.api_key, model, n, args.max_tokens, args.temperature)
            )
    rows = [
        (
            n,
            r["tok_per_s"],
            r["ttft_p50_s"] * 1e3,
            r["ttft_p99_s"] * 1e3,
            r["itl_p50_s"] * 1e3,
            r["itl_p99_s"] * 1e3,
        )
        for n, r in ((n, results[str(n)]) for n in levels)
    ]
    cols = ["streams", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    print_table("concurrent streaming over HTTP", cols, rows, f"{model}, {args.max_tokens} tokens per stream")
    if args.plot:
        fig, (ax, bx) = new_figure(2)
        ax.plot(levels, [results[str(n)]["tok_per_s"] for n in levels], marker="o")
        ax.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", title="Throughput", xscale="log")
        for key, label in (("ttft_p50_s", "TTFT p50"), ("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99")):
            bx.plot(levels, [results[str(n)][key] * 1e3 for n in levels], marker="o", label=label)
        bx.set(xlabel="concurrent streams", ylabel="ms", title="Latency", xscale="log", yscale="log")
        bx.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(results)
    return 0
