"""Streaming perplexity (StreamingLLM figure 3): feed token i, score token i + 1, through our runner.

Modes, all with the same total cache size `sinks + window` except dense:
- dense: nothing is evicted (no sinks, window >= the text); refused past the model's context.
- window: plain window attention, the last `sinks + window` tokens, no sinks.
- sink: StreamingLLM, `sinks` initial tokens + the last `window` tokens.
- recompute: sliding window with re-computation, the paper's (expensive) baseline: for each token the
  slot is cleared and the last `sinks + window` tokens are prefilled from scratch at positions 0...

`chunk` > 1 scores `chunk` tokens per forward. For dense, window and sink this stays equal to the token
by token method up to float rounding, because the engine masks every query of a chunk to the sinks and
the last `window` tokens as of its own position. For recompute each forward re-prefills the window
ending at the chunk's last token and scores the whole chunk, so a scored token sees between
`sinks + window - chunk + 1` and `sinks + window` tokens: an approximation, cheaper by ~`chunk` times.
`recompute_chunk` sets that chunk apart, so that the other modes can stay token by token while the
baseline (a full prefill per scored token otherwise) is approximated.

Long streams (the paper's 400K-token and 4M-token runs): several `--text` files are read as one stream,
`--chunk 256` scores it at prefill speed, and `--bucket 10000` reports the perplexity of every 10K-token
bucket, which stays flat for StreamingLLM however long the stream grows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from ..batch import BatchPlan, SeqChunk
from ..config import CacheConfig
from ..kv_pool import KVPool
from ..models import DecoderModel
from ..report import new_figure, print_json, print_table, save_figure, write_csv
from ..runner import ModelRunner
from .buckets import bucket_ppl, plot_buckets, print_bucket_table

MODES = ("dense", "window", "sink", "recompute")


@dataclass(frozen=True)
class PplResult:
    """Per-token negative log-likelihoods (nats) of one mode; nll[j] scores token j + 1 of the text."""

    mode: str
    nll: torch.Tensor  # [T] float64
    seconds: float = 0.0
    """Wall time of the scoring."""

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return float(torch.exp(self.nll.mean()))

    def summary(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        return {"ppl": self.ppl, "nll": self.mean_nll, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": rate}  # fmt: skip


def mode_cache(mode: str, sinks: int, window: int, n_tokens: int, max_context: int | None) -> CacheConfig:
    """The slot shape each mode evaluates with (one slot)."""
    if mode == "dense":
        if max_context is not None and n_tokens > max_context:
            raise ValueError(
                f"dense mode needs a cache of all {n_tokens} tokens, more than the model's context of {max_context}"
            )
        cache = CacheConfig(sink_tokens=0, window=max(n_tokens, 1), num_slots=1)
    elif mode in ("window", "recompute"):
        cache = CacheConfig(sink_tokens=0, window=sinks + window, num_slots=1)
    elif mode == "sink":
        cache = CacheConfig(sink_tokens=sinks, window=window, num_slots=1)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    cache.check_context(max_context)
    return cache


def _nll(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """logits [n, V] fp32, targets n ids -> [n] float64 nats."""
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target, reduction="none").double().cpu()


def streaming_nll(
    runner: ModelRunner, tokens: Sequence[int], chunk: int = 1, tick: Callable[[int], object] | None = None
) -> torch.Tensor:
    """Stream `tokens` through slot 0, `chunk` per forward; [len(tokens) - 1] NLLs."""
    out: list[torch.Tensor] = []
    n = len(tokens)
    for i in range(0, n - 1, chunk):
        piece = tuple(tokens[i : min(i + chunk, n - 1)])
        logits = runner.run(BatchPlan((SeqChunk(0, i, piece, "all"),))).logits[0]  # [len(piece), V]
        out.append(_nll(logits, tokens[i + 1 : i + 1 + len(piece)]))
        if tick:
            tick(len(piece))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def recompute_nll(
    runner: ModelRunner, tokens: Sequence[int], chunk: int = 1, tick: Callable[[int], object] | None = None
) -> torch.Tensor:
    """Sliding window with re-computation: every forward starts from an empty slot."""
    cap = runner.pool.cache.capacity
    if chunk > cap:
        raise ValueError(f"chunk {chunk} exceeds the recompute window of {cap} tokens")
    out: list[torch.Tensor] = []
    n = len(tokens)
    for first in range(1, n, chunk):
        last = min(first + chunk, n) - 1  # scored targets: first..last
        b = last - first + 1
        context = tuple(tokens[max(0, last - cap) : last])
        runner.pool.clear(0)
        if b == 1:
            logits = runner.run(BatchPlan((SeqChunk(0, 0, context, "last"),))).logits[0]  # [1, V]
        else:
            if len(context) > b:
                runner.run(BatchPlan((SeqChunk(0, 0, context[:-b], "none"),)))
            logits = runner.run(BatchPlan((SeqChunk(0, len(context) - b, context[-b:], "all"),))).logits[0]
        out.append(_nll(logits, tokens[first : last + 1]))
        if tick:
            tick(b)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def evaluate(
    model: DecoderModel,
    tokens: Sequence[int],
    modes: Sequence[str],
    sinks: int = 4,
    window: int = 252,
    chunk: int = 1,
    progress: bool = True,
    recompute_chunk: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> dict[str, PplResult]:
    """Perplexity of `tokens` under each mode; the caches are checked before anything runs. `kv_dtype`: the
    KV pools' storage (None: the engine's default for this model, `DecoderModel.default_kv_dtype`)."""
    recompute_chunk = recompute_chunk or chunk
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to score")
    if min(chunk, recompute_chunk) < 1:
        raise ValueError(f"chunks must be >= 1, got {chunk} and {recompute_chunk}")
    caches = {m: mode_cache(m, sinks, window, len(tokens), model.max_context) for m in modes}
    dtype, device = model.lm_head.dtype, model.lm_head.device
    kv_dtype = kv_dtype or model.default_kv_dtype()
    results: dict[str, PplResult] = {}
    for mode, cache in caches.items():
        runner = ModelRunner(model, KVPool(cache, model.kv_shape, dtype, device, kv_dtype))
        start = time.perf_counter()
        with tqdm(
            total=len(tokens) - 1, desc=f"{mode:>9}", unit="tok", disable=not progress, leave=True
        ) as bar:
            if mode == "recompute":
                nll = recompute_nll(runner, tokens, recompute_chunk, bar.update)
            else:
                nll = streaming_nll(runner, tokens, chunk, bar.update)
        results[mode] = PplResult(mode, nll, time.perf_counter() - start)
    return results


def encode_prefix(tokenizer: object, text: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of `text`, tokenising only as much of it as needed."""
    size = max(4096, max_tokens * 8)
    while True:
        ids: list[int] = tokenizer(text[:size])["input_ids"]  # type: ignore[operator]
        if len(ids) > max_tokens + 16 or size >= len(text):
            return ids[:max_tokens]
        size *= 2


GROUP = "eval"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser("ppl", help="streaming perplexity: dense vs window vs sink vs recompute")
    p.add_argument(
        "--text",
        required=True,
        type=Path,
        nargs="+",
        help="UTF-8 text files (e.g. books), read as one stream",
    )
    p.add_argument("--modes", default="dense,window,sink", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument(
        "--sinks",
        type=int,
        default=4,
        help="attention-sink tokens (window and recompute add them to the window)",
    )
    p.add_argument("--window", type=int, default=252, help="sliding-window tokens")
    p.add_argument("--max-tokens", type=int, default=2000, help="tokens of the text to evaluate")
    p.add_argument("--bucket", type=int, help="also report the perplexity of every BUCKET scored tokens")
    p.add_argument(
        "--chunk", type=int, default=1, help="tokens scored per forward (see module doc; 1 = token by token)"
    )
    p.add_argument(
        "--recompute-chunk", type=int, help="tokens scored per recompute forward (default: --chunk)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one final JSON line: mode -> {ppl, nll, tokens, seconds, tokens_per_s[, buckets]}",
    )
    p.add_argument("--csv", type=Path, help="write per-token NLL, one column per mode")
    p.add_argument(
        "--plot",
        type=Path,
        help="write a PNG of log-perplexity (or, with --bucket, bucket PPL) against position",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="KV pool storage (engine.kv_dtype; auto: the engine's default for the model and weights)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import model_from_args

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    loaded = model_from_args(args)
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in args.text)
    tokens = encode_prefix(loaded.tokenizer, text, args.max_tokens)
    rchunk = args.recompute_chunk or args.chunk
    results = evaluate(
        loaded.model,
        tokens,
        modes,
        args.sinks,
        args.window,
        args.chunk,
        not args.no_progress,
        rchunk,
        None if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype),
    )
    names = "+".join(path.stem for path in args.text)
    title = f"{loaded.name}: {names}, {len(tokens)} tokens, sinks {args.sinks}, window {args.window}, chunk {args.chunk}"
    if "recompute" in modes and rchunk != args.chunk:
        title += f" (recompute {rchunk})"
    rows = [[r.mode, r.tokens, r.ppl, r.mean_nll, r.seconds, r.tokens / r.seconds] for r in results.values()]
    print_table(title, ["mode", "tokens", "ppl", "nll", "seconds", "tokens/s"], rows)
    summary = {m: r.summary() for m, r in results.items()}
    if args.bucket:
        buckets = {m: bucket_ppl(r.nll, args.bucket) for m, r in results.items()}
        print_bucket_table(buckets, args.bucket)
        for m in results:
            summary[m]["buckets"] = buckets[m]
    if args.csv:
        cols = list(results.values())
        write_csv(
            args.csv,
            ["position", *results],
            [[j + 1, *(float(r.nll[j]) for r in cols)] for j in range(len(tokens) - 1)],
        )
    if args.plot:
        fig = plot_buckets(buckets, args.bucket, title) if args.bucket else plot_log_ppl(results, title)
        save_figure(fig, args.plot)
    if args.json:
        print_json(summary)
    return 0


def plot_log_ppl(results: dict[str, PplResult], title: str) -> Figure:
    """Running mean of the NLL over the tokens so far (log-PPL of the prefix), one line per mode.
    The y range leaves out the first 5% of positions, where a handful of tokens dominate the mean."""
    fig, (ax,) = new_figure()
    shown: list[torch.Tensor] = []
    for mode, r in results.items():
        running = r.nll.cumsum(0) / torch.arange(1, r.tokens + 1, dtype=torch.float64)
        style = "--" if mode == "recompute" else "-"
        ax.plot(
            range(1, r.tokens + 1), running.numpy(), style, label=f"{mode} (ppl {r.ppl:.2f})", linewidth=1.2
        )
        shown.append(running[r.tokens // 20 :])
    lo, hi = float(torch.cat(shown).min()), float(torch.cat(shown).max())
    ax.set_ylim(lo - 0.1 * (hi - lo + 0.1), hi + 0.1 * (hi - lo + 0.1))
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("log perplexity (running mean of NLL)")
    ax.set_title(f"{title}\nlog-PPL = running mean of per-token NLL over the tokens so far", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
