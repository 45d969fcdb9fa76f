"""`streamllm bench decode`: engine decode throughput with B concurrent sessions vs transformers' generate.

Each session gets its own prompt, is prefilled, then all decode together; only steps in which every
scheduled row is a decode row are timed, so the figure is steady-state batched decode.
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from typing import Any

import torch
from tqdm import tqdm

from ..cli import add_model_args
from ..config import CacheConfig, EngineConfig
from ..engine import Engine, StepStats
from ..report import new_figure, print_json, print_table, save_figure
from ..sampler import SamplingParams

GROUP = "bench"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("decode", help="batched decode throughput vs transformers generate")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated session counts")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per session")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length per session")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="KV pool storage (engine.kv_dtype)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of tok/s against batch size")
    add_model_args(p)
    p.set_defaults(func=run)


def bench_engine(loaded: Any, batch: int, args: argparse.Namespace) -> dict[str, float]:
    cache = CacheConfig(args.sinks, args.window, num_slots=batch, prefill_chunk=256)
    config = EngineConfig(cache=cache, max_batch_tokens=max(512, batch), kv_dtype=args.kv_dtype)
    from ..loader import eos_token_ids

    engine = Engine(loaded.model, loaded.tokenizer, config, eos_token_ids(loaded.tokenizer, loaded.hf_config))
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: StepStats) -> None:
        now = time.perf_counter()
        if step.decode_only and step.rows == batch:
            times.append(now - last[0])
        last[0] = now

    engine.on_step = on_step
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    vocab = loaded.model.vocab_size
    gen = torch.Generator().manual_seed(batch)
    handles = []
    for i in range(batch):
        prompt = torch.randint(100, vocab, (args.prompt_tokens,), generator=gen).tolist()
        handles.append(engine.submit(f"bench-{i}", prompt, params))
    with tqdm(total=args.tokens, desc=f"decode x{batch}", leave=False) as bar:
        while not all(h.stream.done.is_set() for h in handles):
            engine.step()
            bar.n = min(args.tokens, engine.steps)
            bar.refresh()
    steady = times[2:] or times  # the first steps warm up the allocator
    ms = statistics.median(steady) * 1000
    return {"tok_per_s": batch * len(steady) / sum(steady), "ms_per_step": ms}


def bench_hf_generate(loaded: Any, tokens: int, prompt_tokens: int, dtype: torch.dtype) -> float:
    assert loaded.hf_model is not None
    hf = loaded.hf_model.to(device=loaded.model.lm_head.device, dtype=dtype)
    ids = torch.randint(
        100, loaded.model.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(hf.device)
    kw = dict(do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    return tokens / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    from ..loader import load_model, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    loaded = load_model(args.model, dtype=dtype, device=str(device), keep_hf=True, weights=args.weights)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[str, Any] = {}
    for b in tqdm(sizes, desc="batch sizes"):
        results[str(b)] = bench_engine(loaded, b, args)
    hf_tps = bench_hf_generate(loaded, args.tokens, args.prompt_tokens, dtype)
    results["hf_generate_tok_per_s"] = hf_tps
    results["dtype"] = str(dtype).removeprefix("torch.")
    if loaded.model.kernels is not None:  # which kernel each weight role runs per batch bucket, and why
        results["weights"] = loaded.model.kernels.mode
        results["kernels"] = loaded.model.kernels.lines()
    if dtype != torch.float32:  # the reference point is transformers in fp32
        results["hf_generate_fp32_tok_per_s"] = bench_hf_generate(
            loaded, args.tokens, args.prompt_tokens, torch.float32
        )
    base = results[str(sizes[0])]["tok_per_s"]
    rows: list[tuple[Any, ...]] = [
        (b, results[str(b)]["tok_per_s"], results[str(b)]["ms_per_step"], results[str(b)]["tok_per_s"] / base)
        for b in sizes
    ]
    rows.append((f"hf generate (1, {results['dtype']})", hf_tps, 1000 / hf_tps, hf_tps / base))
    if "hf_generate_fp32_tok_per_s" in results:
        fp32 = results["hf_generate_fp32_tok_per_s"]
        rows.append(("hf generate (1, float32)", fp32, 1000 / fp32, fp32 / base))
    caption = (
        f"{loaded.name}, {device}, {dtype}, weights {results.get('weights', 'plain')}, "
        f"cache {args.sinks}+{args.window} ({args.kv_dtype} KV), {args.tokens} tokens/session"
    )
    print_table("decode throughput", ["sessions", "tok/s", "ms/step", f"x vs {sizes[0]}"], rows, caption)
    if args.plot:
        fig, (ax,) = new_figure()
        ax.plot(sizes, [results[str(b)]["tok_per_s"] for b in sizes], marker="o", label="streamllm engine")
        ax.axhline(
            hf_tps, color="gray", linestyle="--", label=f"transformers generate, batch 1, {results['dtype']}"
        )
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="concurrent sessions",
            ylabel="aggregate tokens/s",
            title="Decode throughput\n" + textwrap.fill(caption, 72),
        )
        ax.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(results)
    return 0
