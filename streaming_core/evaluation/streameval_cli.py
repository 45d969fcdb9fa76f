"""`streamllm eval streameval`: StreamEval accuracy against stream length, per attention mode.

Modes, all at the cache size `sinks + window` except dense (see ppl.py for the same four):
- sink: StreamingLLM, one engine session with `sinks` attention sinks and a `window`-token window.
- window: one session with a plain window of `sinks + window` tokens, no sinks.
- dense: one session that evicts nothing; it stops where the stream would pass the model's context.
- recompute: each query re-prefills the last `sinks + window` tokens from scratch (`--recompute-lines`
  bounds its stream: it costs a full prefill per query).
With `--base-url` the stream goes instead as one session through a running server's HTTP API, under
whatever cache the server has (mode `http`).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from ..config import CacheConfig
from ..report import new_figure, print_json, print_table, save_figure
from ..sampler import SamplingParams
from .streameval import FORMATS, Backend, QueryResult, make_records, make_turns, run_stream, summary

GROUP = "eval"
MODES = ("sink", "window", "dense", "recompute")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser(
        "streameval", help="StreamEval: retrieval from recent lines of an endless stream"
    )
    p.add_argument("--modes", default="sink,window,dense", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--lines", type=int, default=500, help="records in the stream")
    p.add_argument(
        "--lag", type=int, default=20, help="a query asks for the line LAG lines back (1: the newest)"
    )
    p.add_argument("--every", type=int, default=10, help="a query after every EVERY new lines")
    p.add_argument("--seed", type=int, default=0, help="seeds the names and values")
    p.add_argument("--format", default="raw", choices=FORMATS, help="raw text, or chat turns")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument(
        "--recompute-lines", type=int, help="records in the recompute mode's stream (default: --lines)"
    )
    p.add_argument("--group", type=int, default=5, help="queries per point of the accuracy curve")
    p.add_argument("--base-url", help="run the stream through this server's HTTP API as one session instead")
    p.add_argument("--api-key", default="none")
    p.add_argument(
        "--json", action="store_true", help="end with one JSON line: mode -> {accuracy, queries, ...}"
    )
    p.add_argument("--plot", help="write a PNG of accuracy against stream length")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def sampling(fmt: str) -> SamplingParams:
    """Greedy; a raw answer ends at the record's closing '>', a chat answer at the end of its turn."""
    if fmt == "raw":
        return SamplingParams(max_tokens=8, temperature=0.0, stop=(">", "\n"))
    return SamplingParams(max_tokens=32, temperature=0.0, stop=("\n",))


def backends(args: argparse.Namespace, modes: list[str], params: SamplingParams) -> dict[str, Backend]:
    from ..cli import model_from_args
    from ..loader import eos_token_ids
    from .stream_backends import EngineStream, HttpStream, RecomputeStream

    if args.base_url:
        return {
            "http": HttpStream(
                args.base_url, args.api_key, params, args.format, f"streameval-{uuid.uuid4().hex[:8]}"
            )
        }
    loaded = model_from_args(args)
    model, tok, eos = loaded.model, loaded.tokenizer, eos_token_ids(loaded.tokenizer, loaded.hf_config)
    context = model.max_context or 8192
    caches = {
        "sink": CacheConfig(args.sinks, args.window, num_slots=1),
        "window": CacheConfig(0, args.sinks + args.window, num_slots=1),
        "dense": CacheConfig(0, context, num_slots=1),
        "recompute": CacheConfig(0, args.sinks + args.window, num_slots=1),
    }
    out: dict[str, Backend] = {}
    for mode in modes:
        if mode not in caches:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        caches[mode].check_context(model.max_context)
        kind = RecomputeStream if mode == "recompute" else EngineStream
        limit = context if mode == "dense" else None
        out[mode] = kind(model, tok, eos, caches[mode], params, args.format, limit)
    return out


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    params = sampling(args.format)
    records = make_records(args.lines, args.seed)
    streams = backends(args, modes, params)
    results: dict[str, list[QueryResult]] = {}
    for mode, backend in streams.items():
        lines = args.recompute_lines if mode == "recompute" and args.recompute_lines else args.lines
        turns = make_turns(records[:lines], args.lag, args.every)
        with tqdm(total=len(turns), desc=f"{mode:>9}", unit="query", disable=args.no_progress) as bar:
            results[mode] = run_stream(backend, turns, args.format, bar.update)
    out = {m: summary(r, args.group) for m, r in results.items()}
    cache = f"cache {args.sinks}+{args.window}" if not args.base_url else f"server {args.base_url}"
    title = (
        f"StreamEval ({args.format}): {args.lines} lines, lag {args.lag}, query every {args.every}, {cache}"
    )
    print_curves(out, title)
    if args.plot:
        save_figure(plot_curves(out, title, None if args.base_url else args.sinks + args.window), args.plot)
    if args.json:
        print_json(out)
    return 0


def print_curves(out: dict[str, dict[str, Any]], title: str) -> None:
    modes = list(out)
    longest = max(modes, key=lambda m: len(out[m]["curve"]))
    rows = []
    for i, point in enumerate(out[longest]["curve"]):
        cells = [out[m]["curve"][i]["accuracy"] if i < len(out[m]["curve"]) else "" for m in modes]
        rows.append([point["lines"], point["tokens"], *cells])
    rows.append(["all", "", *(out[m]["accuracy"] for m in modes)])
    caption = (
        "stream tokens: at the last query of each group (" + longest + "); dense stops at the model's context"
    )
    print_table(title, ["lines", "stream tokens", *modes], rows, caption)


def plot_curves(out: dict[str, dict[str, Any]], title: str, capacity: int | None) -> Figure:
    fig, (ax,) = new_figure(width=8.0)
    for mode, s in out.items():
        xs = [p["tokens"] for p in s["curve"]]
        ax.plot(
            xs, [p["accuracy"] for p in s["curve"]], marker="o", label=f"{mode} ({s['accuracy']:.0%} overall)"
        )
    if capacity:
        ax.axvline(capacity, color="grey", linestyle=":", label=f"cache size ({capacity})")
    ax.set_ylim(-0.05, 1.05)
    ax.set(xlabel="stream length (tokens)", ylabel="accuracy of the queries")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
