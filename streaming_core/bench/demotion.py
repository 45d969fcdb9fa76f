"""`streamllm bench demotion`: decode step time while an idle session's KV is demoted from its slot.

`--streams` sessions decode without end while, trial after trial, a new session needs the last slot and
the least recently used idle one is moved down to the host tier. We time every engine step: steps with no
KV move, the step that starts a demotion, and the steps that follow until the new session is admitted and
prefilled (asynchronously, they run while the worker copies), and "paired": each demotion step minus the
median of the plain steps just before it. The sync mode waits for the copy inside the step, as the engine
did before the tiers, for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from ..cli import add_model_args, model_from_args
from ..config import CacheConfig, EngineConfig
from ..engine import Engine
from ..report import new_figure, print_json, print_table, save_figure
from ..sampler import SamplingParams

GROUP = "bench"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demotion", help="decode step time with and without a slot->host demotion in the step")
    p.add_argument("--streams", type=int, default=3, help="sessions decoding throughout")
    p.add_argument("--trials", type=int, default=12, help="demotions timed per mode")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of step times")
    add_model_args(p)
    p.set_defaults(func=run)


def _engine(loaded: Any, args: argparse.Namespace) -> Engine:
    cache = CacheConfig(args.sinks, args.window, num_slots=args.streams + 1, prefill_chunk=256)
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(cache=cache))


def _timed(engine: Engine) -> float:
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def _trials(engine: Engine, args: argparse.Namespace, sync: bool) -> dict[str, list[float]]:
    forever = SamplingParams(max_tokens=1 << 30, temperature=0, ignore_eos=True)
    for i in range(args.streams):
        engine.submit(f"stream-{i}", [100 + i] * 8, forever)
    out: dict[str, list[float]] = {"plain": [], "demotion": [], "following": [], "paired": []}
    if sync:  # the copy inside the step, as `_move_kv` did before the tiers
        move = engine.runner._move_kv

        def move_and_wait(plan: Any) -> None:
            move(plan)
            engine.tiers.flush()

        engine.runner._move_kv = move_and_wait  # type: ignore[method-assign]
    previous = None
    for t in tqdm(range(args.trials + 1), desc="sync" if sync else "async", unit="demotion"):
        plain = [_timed(engine) for _ in range(5)]
        if previous is not None:  # the first trial's steps include the streams' prefill
            out["plain"] += plain
        sid = f"new-{t}"
        engine.submit(sid, [7, 8, 9], None)  # prefill only: the session then sits idle in its slot
        offloads = engine.scheduler.offloads
        while (st := engine.stats(sid)) is None or st.location != "slot" or st.busy:
            dt = _timed(engine)
            started = engine.scheduler.offloads > offloads
            if previous is not None:  # the first trial only fills the last slot
                out["demotion" if started else "following"].append(dt)
                if started:  # against this trial's own plain steps: the machine's load drifts
                    out["paired"].append(dt - statistics.median(plain))
            offloads = engine.scheduler.offloads
        previous = sid
    engine.stop()
    return out


def _ms(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0, "median_ms": float("nan"), "max_ms": float("nan")}
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3, "max_ms": max(xs) * 1e3}


def run(args: argparse.Namespace) -> int:
    loaded = model_from_args(args)
    torch.manual_seed(0)
    results = {mode: _trials(_engine(loaded, args), args, mode == "sync") for mode in ("async", "sync")}
    probe = _engine(loaded, args)
    entry_mb = probe.tiers.entry_bytes / 2**20
    rows = []
    summary: dict[str, Any] = {"entry_mb": entry_mb, "streams": args.streams}
    for mode, out in results.items():
        for kind, xs in out.items():
            stats = _ms(xs)
            summary[f"{mode}_{kind}"] = stats
            rows.append((mode, kind, stats["n"], stats["median_ms"], stats["max_ms"]))
    caption = (
        f"{loaded.name}, {probe.pool.device}, {probe.pool.dtype}, cache {args.sinks}+{args.window}, "
        f"{args.streams} decoding streams; one demotion copies {entry_mb:.1f} MiB"
    )
    print_table(
        "engine step time around slot demotions", ["mode", "steps", "n", "median ms", "max ms"], rows, caption
    )
    if args.plot:
        fig, (ax,) = new_figure()
        for mode, out in results.items():
            for kind in ("plain", "demotion"):
                ax.plot([x * 1e3 for x in out[kind]], marker="o", linestyle="", label=f"{mode}: {kind} steps")
        ax.set(xlabel="step (in order, per kind)", ylabel="step time, ms")
        ax.set_title(caption, fontsize=8)
        ax.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(summary)
    return 0
