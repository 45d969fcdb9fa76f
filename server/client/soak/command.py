"""`streamllm bench soak`: many multi-turn conversations for a while, with faults, then the invariants.

    streamllm bench soak --duration 60 --streams 32 --faults redis,disconnect,delete,kill-replica

Without --base-url it starts its own Redis and one `streamllm serve` (two with kill-replica) on it;
with one it talks to that server, and only client-side faults (disconnect, delete) are possible. Exits 1
when an invariant fails (see checks.py and the accounting in clients.py), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from .checks import check_sessions, invariants, rss_growth, summary
from .clients import RunContext, SoakClient
from .cluster import Cluster
from .faults import FAULTS, Injector, schedule
from .output import plot, print_report, write_json

GROUP = "bench"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("soak", help="long mixed multi-turn load with faults; fails on broken invariants")
    p.add_argument("--base-url", help="a running server (default: start Redis and servers locally)")
    p.add_argument("--api-key", default="none", help="Bearer key the clients send")
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which turns start")
    p.add_argument("--streams", type=int, default=32, help="concurrent conversations")
    p.add_argument("--faults", default="", help=f"comma-separated, of: {','.join(FAULTS)}")
    p.add_argument(
        "--replicas", type=int, help="local servers on the one Redis (default 1; 2 with kill-replica)"
    )
    p.add_argument("--recovery", type=float, default=5.0, help="seconds after an outage still counted in it")
    p.add_argument("--settle", type=float, default=5.0, help="quiet seconds before the final checks")
    p.add_argument("--lease", type=float, default=3.0, help="replica lease of the local servers, s")
    p.add_argument("--request-timeout", type=float, default=30.0, help="client read timeout, s")
    p.add_argument("--rss-limit-mb", type=float, default=256.0, help="largest RSS growth of a server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/soak"), help="writes OUT.json and OUT.png")
    p.add_argument("--work-dir", type=Path, help="server logs and Redis data (default: a temp dir)")
    p.set_defaults(func=run)


def parse_faults(text: str) -> set[str]:
    faults = {f.strip() for f in text.split(",") if f.strip()}
    unknown = faults - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {','.join(FAULTS)}")
    return faults


def run(args: argparse.Namespace) -> int:
    try:
        faults = parse_faults(args.faults)
    except ValueError as e:
        print(f"streamllm bench soak: {e}")
        return 2
    if args.base_url and faults & {"redis", "kill-replica"}:
        print("streamllm bench soak: redis and kill-replica faults need the local servers (no --base-url)")
        return 2
    replicas = args.replicas or (2 if "kill-replica" in faults else 1)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamllm-soak-"))
    env = {
        "STREAMLLM_SERVER__REPLICA_LEASE_SECONDS": str(args.lease),
        "STREAMLLM_SERVER__SHUTDOWN_GRACE_SECONDS": "2",
    }
    print(f"soak: starting {replicas} server(s); logs and Redis data in {work}", flush=True)
    cluster = Cluster.remote(args.base_url) if args.base_url else Cluster.local(work, replicas, env)
    try:
        result, attempts = asyncio.run(soak(args, cluster, faults))
    finally:
        cluster.stop()
    result["work_dir"] = str(work)
    print_report(result)
    write_json(result, args.out.with_suffix(".json"))
    plot(result, attempts, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0 if all(i["ok"] for i in result["invariants"]) else 1


async def soak(args: argparse.Namespace, cluster: Cluster, faults: set[str]) -> tuple[dict[str, Any], list]:
    url = cluster.url(0)
    assert url is not None
    headers = {"Authorization": f"Bearer {args.api_key}"}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    ctx = RunContext(uuid.uuid4().hex[:6], args.seed, faults, time.monotonic(), args.duration, args.settle)
    injector = Injector(cluster, ctx.t0, args.recovery, args.lease, args.seed)
    limits = httpx.Limits(max_connections=4 * args.streams + 8, max_keepalive_connections=2 * args.streams)
    timeout = httpx.Timeout(args.request_timeout, connect=5.0)
    rss: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as http:
        clients = [SoakClient(i, cluster, model, ctx, http) for i in range(args.streams)]
        faulting = asyncio.create_task(injector.run(schedule(faults, args.duration)))
        background = [
            asyncio.create_task(sample_rss(cluster, ctx, rss)),
            asyncio.create_task(progress(ctx, clients)),
        ]
        await asyncio.wait_for(
            asyncio.gather(*(c.run() for c in clients)), args.duration + args.request_timeout + 60
        )
        await faulting  # a replica still restarting comes back before the checks
        await asyncio.to_thread(cluster.healthy, 120.0)
        await asyncio.sleep(args.settle)
        checks = await check_sessions(clients, stuck_after=args.recovery + args.lease)
        for task in background:
            task.cancel()
    attempts = sorted((a for c in clients for a in c.attempts), key=lambda a: a.start)
    growth = rss_growth(rss, warmup=max(5.0, 0.1 * args.duration))
    result = {
        "duration_s": args.duration,
        "streams": args.streams,
        "faults": sorted(faults),
        "replicas": cluster.size,
        "model": model,
        "summary": summary(attempts, checks),
        "invariants": invariants(attempts, checks, injector, growth, args.rss_limit_mb),
        "outages": [o.as_dict() for o in injector.outages],
        "fault_failures": injector.failures,
        "rss_growth": growth,
        "rss": rss,
        "sessions": [vars(c) for c in checks],
        "attempts": [vars(a) for a in attempts],
    }
    return result, attempts


async def sample_rss(cluster: Cluster, ctx: RunContext, out: list[dict[str, Any]]) -> None:
    while True:
        t = ctx.now()
        for name, (pid, mb) in cluster.rss().items():
            out.append({"t": round(t, 2), "replica": name, "pid": pid, "rss_mb": round(mb, 1)})
        await asyncio.sleep(1.0)


async def progress(ctx: RunContext, clients: list[SoakClient]) -> None:
    with tqdm(total=round(ctx.stop_at), desc="soak", unit="s") as bar:
        while ctx.now() < ctx.stop_at:
            await asyncio.sleep(1.0)
            bar.n = min(round(ctx.now()), bar.total)
            attempts = [a for c in clients for a in c.attempts]
            bar.set_postfix(
                acked=sum(a.acked for a in attempts), failed=sum(a.server_failure for a in attempts)
            )
        bar.n = bar.total
        bar.refresh()
