"""`streamllm bench http-overhead`: one streaming HTTP client against the engine alone, in one run.

The engine alone is an `Engine` in this process with the server's default settings, stepping one session
to completion; over HTTP, a local `streamllm serve` per mode (the engine as a thread of the server, and
as a process of its own: `server.engine_process`) streams a chat reply of the same length to the OpenAI
SDK client. Every server stays up for the whole run and the three measurements alternate round by round,
so the machine's drift lands on all of them alike. Per round: the median gap between decode steps (the
engine) or between content chunks (HTTP); the result is each mode's median over the rounds, and its rate
as a share of the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import time
from typing import Any

from tqdm import tqdm

from streaming_core.report import new_figure, print_json, print_table, save_figure

from .bench_serve import one_client
from .local import start_server, stop

GROUP = "bench"
MODES = {"thread": "false", "process": "true"}
"""Mode -> STREAMLLM_SERVER__ENGINE_PROCESS."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "http-overhead",
        help="one HTTP stream against the engine alone, interleaved: ITL and share of the engine's rate",
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=256, help="tokens per reply")
    p.add_argument("--modes", default="thread,process", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of the per-round step and ITL")
    p.set_defaults(func=run)


def engine_alone_ms(engine: Any, i: int, tokens: int) -> float:
    """Median ms between the decode steps of one session generating `tokens` tokens, inline."""
    from streaming_core.sampler import SamplingParams

    stamps: list[float] = []
    engine.on_step = lambda step: stamps.append(time.perf_counter()) if step.decode_only else None
    prompt = engine.tokenizer.encode(f"Tell me a long story about lighthouse number {i}.")
    handle = engine.submit(None, prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    engine.run_until_done(handle)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)) * 1e3


async def measure(modes: list[str], rounds: int, tokens: int) -> dict[str, list[float]]:
    from openai import AsyncOpenAI

    from streaming_core.config import EngineConfig
    from streaming_core.loader import build_engine

    results: dict[str, list[float]] = {"engine": [], **{m: [] for m in modes}}
    with contextlib.ExitStack() as stack:
        clients = {}
        for mode in modes:
            proc, url = start_server(env={"STREAMLLM_SERVER__ENGINE_PROCESS": MODES[mode]})
            stack.callback(stop, proc)
            clients[mode] = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
        engine = build_engine(EngineConfig())  # the server's defaults: 16 slots, 4+1020, bf16 KV
        model = (await next(iter(clients.values())).models.list()).data[0].id
        engine_alone_ms(engine, 0, 32)  # warm-up, as each server gets
        for client in clients.values():
            await one_client(client, model, 0, 32, 0.0)
        for r in tqdm(range(rounds), desc="rounds"):
            results["engine"].append(engine_alone_ms(engine, r, tokens))
            for mode, client in clients.items():
                out = await one_client(client, model, r, tokens, 0.0)
                results[mode].append(statistics.median(out["itl"]) * 1e3)
        for client in clients.values():
            await client.close()
    return results


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes takes {', '.join(MODES)}; got {args.modes!r}")
    per_round = asyncio.run(measure(modes, args.rounds, args.tokens))
    engine_ms = statistics.median(per_round["engine"])
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    summary = {
        name: {"ms_p50": ms, "share_of_engine": engine_ms / ms, "rounds": per_round[name]}
        for name, ms in medians.items()
    }
    rows = [(name, ms, 1e3 / ms, 100 * engine_ms / ms) for name, ms in medians.items()]
    print_table(
        "one stream over HTTP against the engine alone",
        ["measured", "ms/token (median of rounds)", "tok/s", "% of the engine"],
        rows,
        f"{args.rounds} rounds x {args.tokens} tokens, alternated",
    )
    if args.plot:
        fig, (ax,) = new_figure(1)
        for name, values in per_round.items():
            ax.plot(range(len(values)), values, marker="o", label=name)
        ax.set(
            xlabel="round", ylabel="ms per token (median in the round)", title="One stream: HTTP vs engine"
        )
        ax.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json({"tokens": args.tokens, "rounds": args.rounds, **summary})
    return 0
