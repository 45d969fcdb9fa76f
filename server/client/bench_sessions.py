"""`streamllm bench sessions`: many one-turn conversations through the HTTP API; the server's memory stays
bounded by the KV tier budgets, and every conversation still continues with its turn count intact.

A local server is started with the default settings (or `--config`) and a data directory of its own (the
disk KV tier lives there; converted models are shared with the default data directory). Each conversation
gets one turn, then every one gets a second (most recent first, or in the same order: `--order`), which
finds its KV in a slot, in host memory, on disk, or rebuilds it from Redis; we sample the server's RSS (from /proc) and its
`streamllm:kv_tier_*` metrics along the way. The target: RSS growth beyond the first `--resident`
conversations (the device slots) stays under the host budget + 0.5 GB.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from streaming_core.loader import default_data_dir
from streaming_core.report import new_figure, print_json, print_table, save_figure

from ..settings import Settings
from .local import start_server, stop

GROUP = "bench"
MARGIN = 0.5e9


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sessions", help="server RSS and KV tiers over many one-turn conversations")
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4, help="conversations in flight at once")
    p.add_argument("--max-tokens", type=int, default=4, help="reply length per turn")
    p.add_argument("--resident", type=int, default=16, help="conversations before the RSS baseline")
    p.add_argument(
        "--order",
        choices=["reverse", "same"],
        default="reverse",
        help="second turns most recent first (reverse: promotions from each tier) or in the first order "
        "(same: LRU's worst case, every second turn a rebuild once the tiers overflow)",
    )
    p.add_argument("--config", help="server YAML (default: the built-in defaults)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--plot", help="write a PNG of RSS and tier bytes against conversations")
    p.set_defaults(func=run)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def tiers(client: httpx.Client) -> dict[str, float]:
    """'sessions:host', 'bytes:disk', 'demotions:none', ... from /metrics."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith("streamllm:kv_tier") or "_created{" in line:
            continue
        series, value = line.rsplit(" ", 1)
        name, labels = series.split("{", 1)
        parts = dict(p.split("=", 1) for p in labels.rstrip("}").split(","))
        key = parts.get("tier", parts.get("kind", "")).strip('"')
        short = name.removeprefix("streamllm:kv_tier_").removesuffix("_total")
        out[f"{short}:{key}"] = float(value)
    return out


def turn(client: httpx.Client, model: str, sid: str, text: str, max_tokens: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "session_id": sid,
        "session_mode": "delta",
    }
    r = client.post("/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()


def _pass(
    client: httpx.Client, model: str, ids: list[str], text: str, args: argparse.Namespace, sample: Any
) -> None:
    with ThreadPoolExecutor(args.concurrency) as pool, tqdm(total=len(ids), desc=text, unit="conv") as bar:
        for i, _ in enumerate(pool.map(lambda sid: turn(client, model, sid, text, args.max_tokens), ids)):
            bar.update()
            sample(i + 1)


def run(args: argparse.Namespace) -> int:
    settings = Settings(config=args.config) if args.config else Settings()
    host_budget = settings.engine.cache.host_budget_bytes
    n = args.conversations
    every = max(1, n // 25)
    with tempfile.TemporaryDirectory(prefix="streamllm-bench-sessions-") as tmp:
        data = Path(tmp)
        models = (settings.data_dir or default_data_dir()) / "models"
        if models.is_dir():
            (data / "models").symlink_to(models)  # no second conversion of the default model
        proc, url = start_server(data, args.config, env={"STREAMLLM_DATA_DIR": str(data)})
        points: list[dict[str, Any]] = []
        try:
            with httpx.Client(base_url=url) as client:
                model = client.get("/v1/models").json()["data"][0]["id"]
                base = rss(proc.pid)
                ids = [f"bench-{i:05d}" for i in range(n)]
                start = time.monotonic()

                def sample(done: int, phase: str) -> None:
                    if done == min(args.resident, n) or done % every == 0 or done == n:
                        points.append({"phase": phase, "done": done, "rss": rss(proc.pid), **tiers(client)})

                _pass(client, model, ids, "Hello! Who are you?", args, lambda d: sample(d, "first"))
                first_s = time.monotonic() - start
                again = ids[::-1] if args.order == "reverse" else ids
                _pass(client, model, again, "And what can you do?", args, lambda d: sample(d, "second"))
                infos = [client.get(f"/v1/sessions/{sid}").json() for sid in ids]
        finally:
            stop(proc)
    return report(args, points, infos, base, host_budget, first_s, time.monotonic() - start)


def report(
    args: argparse.Namespace,
    points: list[dict[str, Any]],
    infos: list[dict[str, Any]],
    base: int,
    host_budget: int,
    first_s: float,
    total_s: float,
) -> int:
    resident = min(args.resident, args.conversations)
    after_resident = next(p["rss"] for p in points if p["phase"] == "first" and p["done"] == resident)
    peak = max(p["rss"] for p in points)
    growth = peak - after_resident
    limit = host_budget + MARGIN
    intact = sum(1 for i in infos if i.get("turns") == 2)
    rebuilt = sum(1 for i in infos if i.get("rebuilds", 0) > 0)
    end = points[-1]
    promoted = {t: end.get(f"promotions:{t}", 0) for t in ("host", "disk")}
    rows = [
        (
            f"{p['phase']} turn",
            int(p["done"]),
            p["rss"] / 1e9,
            p.get("sessions:host", 0),
            p.get("sessions:disk", 0),
        )
        for p in points
    ]
    print_table(
        f"{args.conversations} one-turn conversations, then a second turn each",
        ["pass", "conversations", "server RSS GB", "host sessions", "disk sessions"],
        rows,
        f"RSS growth beyond the first {resident}: {growth / 1e9:.3f} GB (limit {limit / 1e9:.3f}); "
        f"second turns with turns == 2: {intact}/{len(infos)}; KV from host {promoted['host']:.0f}, "
        f"from disk {promoted['disk']:.0f}, rebuilt {rebuilt}",
    )
    result = {
        "conversations": args.conversations,
        "concurrency": args.concurrency,
        "order": args.order,
        "rss_start_bytes": base,
        "rss_after_resident_bytes": after_resident,
        "rss_peak_bytes": peak,
        "rss_growth_beyond_resident_bytes": growth,
        "limit_bytes": limit,
        "within_limit": growth <= limit,
        "turns_intact": intact,
        "rebuilt": rebuilt,
        "first_pass_seconds": first_s,
        "total_seconds": total_s,
        "tiers_at_end": {k: v for k, v in end.items() if ":" in k},
        "points": points,
    }
    if args.plot:
        fig, (ax,) = new_figure()
        x = list(range(len(points)))
        ax.plot(x, [p["rss"] / 1e9 for p in points], marker="o", label="server RSS")
        ax.plot(x, [p.get("bytes:host", 0) / 1e9 for p in points], marker="s", label="host tier")
        ax.plot(x, [p.get("bytes:disk", 0) / 1e9 for p in points], marker="^", label="disk tier")
        ax.axhline((after_resident + limit) / 1e9, color="red", linestyle="--", label="RSS limit")
        ax.set_xticks(x[:: max(1, len(x) // 10)])
        ax.set_xticklabels([f"{p['phase'][0]}{int(p['done'])}" for p in points][:: max(1, len(x) // 10)])
        ax.set(xlabel="pass (f: first, s: second turn) and conversations done", ylabel="GB")
        ax.set_title(f"Server memory over {args.conversations} conversations", fontsize=9)
        ax.legend()
        save_figure(fig, args.plot)
    if args.json:
        print_json(result)
    return 0 if growth <= limit and intact == len(infos) else 1
