"""Per-token decode latency and memory: StreamingLLM vs sliding window with re-computation (paper fig. 10).

For each cache size C:
- streaming: one slot of 4 sinks + (C - 4) window tokens, filled to capacity, then one token per
  forward, every step evicting the oldest window token;
- recompute: every new token clears the slot and prefills the last C tokens from scratch in one
  forward, taking the last token's logits.
Latency is the median over the timed tokens after warm-up. Memory is the peak increase over what was
allocated before the method's KV pool (see bench/memory.py for how it is measured on each device).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..batch import BatchPlan, SeqChunk
from ..config import CacheConfig
from ..kv_pool import KVPool
from ..models import DecoderModel
from ..report import new_figure, print_json, print_table, save_figure
from ..runner import ModelRunner
from .memory import PeakMemory

GROUP = "bench"
SINKS = 4


def _timed(steps: Callable[[int], object], device: torch.device, warmup: int, n: int) -> float:
    """Median milliseconds of `steps(k)` for k in warm-up + timed steps."""
    times: list[float] = []
    for k in range(warmup + n):
        t0 = time.perf_counter()
        steps(k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _runner(model: DecoderModel, cache: CacheConfig) -> ModelRunner:
    return ModelRunner(model, KVPool(cache, model.kv_shape, model.lm_head.dtype, model.lm_head.device))


def streaming_latency(
    model: DecoderModel, size: int, ids: list[int], warmup: int, n: int
) -> tuple[float, float]:
    """(median ms per token, peak MB) decoding into a full sink+window slot of `size` tokens."""
    sinks = min(SINKS, size - 1)
    mem = PeakMemory(model.lm_head.device)
    runner = _runner(model, CacheConfig(sink_tokens=sinks, window=size - sinks, num_slots=1))
    chunk = runner.pool.cache.prefill_chunk
    for i in range(0, size, chunk):
        runner.run(BatchPlan((SeqChunk(0, i, tuple(ids[i : min(i + chunk, size)]), "none"),)))

    def step(k: int) -> None:
        runner.run(BatchPlan((SeqChunk(0, size + k, (ids[size + k],), "last"),)))

    with mem:
        ms = _timed(step, runner.device, warmup, n)
    return ms, mem.peak_mb


def recompute_latency(
    model: DecoderModel, size: int, ids: list[int], warmup: int, n: int
) -> tuple[float, float]:
    """(median ms per token, peak MB) re-prefilling the last `size` tokens for every new token."""
    mem = PeakMemory(model.lm_head.device)
    runner = _runner(model, CacheConfig(sink_tokens=0, window=size, num_slots=1, prefill_chunk=size))

    def step(k: int) -> None:
        runner.pool.clear(0)
        runner.run(BatchPlan((SeqChunk(0, 0, tuple(ids[k + 1 : k + 1 + size]), "last"),)))

    with mem:
        ms = _timed(step, runner.device, warmup, n)
    return ms, mem.peak_mb


def bench(
    model: DecoderModel, sizes: list[int], tokens: int = 16, recompute_tokens: int = 4, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Both methods for every cache size; keys are the sizes as strings (JSON-ready)."""
    for size in sizes:
        if size < 2:
            raise ValueError(f"cache sizes must be >= 2, got {size}")
        CacheConfig(sink_tokens=SINKS, window=max(size - SINKS, 1)).check_context(model.max_context)
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, model.vocab_size, (2 * SINKS + 2,), generator=gen).tolist()
    streaming_latency(model, SINKS + 1, warm, 1, 1)  # first-touch costs (weights, kernels) stay out
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        ids = torch.randint(
            0, model.vocab_size, (size + warmup + max(tokens, recompute_tokens) + 1,), generator=gen
        )
        s_ms, s_mb = streaming_latency(model, size, ids.tolist(), warmup, tokens)
        r_ms, r_mb = recompute_latency(model, size, ids.tolist(), warmup, recompute_tokens)
        out[str(size)] = {
            "streaming_ms": s_ms,
            "recompute_ms": r_ms,
            "speedup": r_ms / s_ms,
            "streaming_mem_mb": s_mb,
            "recompute_mem_mb": r_mb,
        }
    return out


def plot_latency(results: dict[str, dict[str, float]], title: str, mem_note: str) -> Figure:
    fig, (ax_t, ax_m) = new_figure(panels=2, width=5.5)
    sizes = [int(s) for s in results]
    for key, label in (("streaming", "StreamingLLM"), ("recompute", "sliding window w/ recompute")):
        ax_t.plot(sizes, [r[f"{key}_ms"] for r in results.values()], marker="o", label=label)
        ax_m.plot(sizes, [r[f"{key}_mem_mb"] for r in results.values()], marker="o", label=label)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("per-token decode latency (ms, median)")
    ax_m.set_ylabel(f"peak memory increase (MB)\n{mem_note}", fontsize=8)
    for ax in (ax_t, ax_m):
        ax.set_xlabel("cache size (tokens)")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser("latency", help="per-token latency and memory: StreamingLLM vs recompute")
    p.add_argument(
        "--cache-sizes", default="256,512,1024", help="comma-separated cache sizes (sinks + window)"
    )
    p.add_argument("--tokens", type=int, default=16, help="timed StreamingLLM decode tokens per size")
    p.add_argument(
        "--recompute-tokens", type=int, default=4, help="timed recompute tokens per size (each is a prefill)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed tokens before timing, per method and size")
    p.add_argument(
        "--json", action="store_true", help="print one final JSON line: size -> latencies, speedup, memory"
    )
    p.add_argument("--plot", type=Path, help="write a PNG of latency and memory against cache size")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import model_from_args

    sizes = [int(s) for s in args.cache_sizes.split(",") if s.strip()]
    loaded = model_from_args(args)
    device = loaded.model.lm_head.device
    results = bench(loaded.model, sizes, args.tokens, args.recompute_tokens, args.warmup)
    mem_note = PeakMemory(device).method
    title = f"{loaded.name} on {device} ({loaded.model.lm_head.dtype}), {SINKS} sinks"
    if device.type == "cpu":
        title += f", {torch.get_num_threads()} threads"
    columns = ["cache", "streaming ms", "recompute ms", "speedup", "streaming MB", "recompute MB"]
    rows = [[size, *r.values()] for size, r in results.items()]
    print_table(title, columns, rows, caption=f"latency: median per token; memory: {mem_note}")
    if args.plot:
        save_figure(plot_latency(results, title, mem_note), args.plot)
    if args.json:
        print_json(results)
    return 0
