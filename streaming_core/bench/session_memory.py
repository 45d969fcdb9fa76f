"""`streamllm bench memory`: one session streams N tokens; its KV bytes and the process memory stay flat.

The slot's KV is preallocated (capacity x layers x 2 x kv_heads x head_dim x dtype size), so the
figure to watch is everything else: the process RSS (CPU) or allocated device memory (CUDA) sampled
at checkpoints while tokens stream through chunked prefill with eviction.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from tqdm import tqdm

from ..batch import BatchPlan, SeqChunk
from ..cli import add_model_args, model_from_args
from ..config import CacheConfig
from ..kv_pool import KVPool
from ..report import new_figure, print_json, print_table, save_figure
from ..runner import ModelRunner
from .memory import rss_bytes

GROUP = "bench"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("memory", help="KV and process memory of one session over a long stream")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens streamed through the session")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward (chunked prefill)")
    p.add_argument("--checkpoints", type=int, default=10)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of memory against tokens streamed")
    add_model_args(p)
    p.set_defaults(func=run)


def _used_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_bytes() / 2**20


def run(args: argparse.Namespace) -> int:
    loaded = model_from_args(args)
    model = loaded.model
    cache = CacheConfig(args.sinks, args.window, num_slots=1, prefill_chunk=args.chunk)
    cache.check_context(model.max_context)
    device = model.lm_head.device
    pool = KVPool(cache, model.kv_shape, model.lm_head.dtype, device)
    runner = ModelRunner(model, pool)
    s = model.kv_shape
    formula = cache.capacity * s.layers * 2 * s.kv_heads * s.head_dim * pool.k.element_size()
    slot_bytes = pool.k[:, 0].nbytes + pool.v[:, 0].nbytes
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, model.vocab_size, (args.tokens,), generator=gen).tolist()
    every = max(args.chunk, args.tokens // args.checkpoints)
    points: list[dict[str, float]] = []
    for start in tqdm(range(0, args.tokens, args.chunk), desc="streaming", unit="chunk"):
        chunk = tuple(tokens[start : start + args.chunk])
        runner.run(BatchPlan((SeqChunk(0, start, chunk, "last"),)))
        seen = start + len(chunk)
        if seen % every < args.chunk or seen == args.tokens:
            cached = int((pool.pos[0] >= 0).sum())
            points.append(
                {
                    "tokens": seen,
                    "cache_tokens": cached,
                    "kv_mb": slot_bytes / 2**20,
                    "process_mb": _used_mb(device),
                }
            )
    mem = "allocated CUDA memory" if device.type == "cuda" else "process RSS"
    rows = [(int(p["tokens"]), int(p["cache_tokens"]), p["kv_mb"], p["process_mb"]) for p in points]
    caption = f"{loaded.name}, {device}, {pool.dtype}, cache {args.sinks}+{args.window}; KV formula {formula / 2**20:.2f} MB"
    print_table(
        "session memory over a long stream",
        ["tokens", "cache tokens", "slot KV MB", f"{mem} MB"],
        rows,
        caption,
    )
    first, last = points[0]["process_mb"], points[-1]["process_mb"]
    result = {
        "kv_bytes_per_session": slot_bytes,
        "kv_bytes_formula": formula,
        "capacity": cache.capacity,
        "tokens": args.tokens,
        "process_mb_first": first,
        "process_mb_last": last,
        "process_mb_growth": last - first,
        "checkpoints": points,
    }
    if args.plot:
        fig, (ax,) = new_figure()
        ax.plot([p["tokens"] for p in points], [p["process_mb"] for p in points], marker="o", label=mem)
        ax.plot(
            [p["tokens"] for p in points], [p["kv_mb"] for p in points], marker="s", label="session KV (slot)"
        )
        ax.set(
            xlabel="tokens streamed",
            ylabel="MB",
            title=f"Memory over a {args.tokens}-token stream ({caption})",
        )
        ax.title.set_fontsize(8)
        ax.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(result)
    return 0 if slot_bytes == formula else 1
