"""After the run: each session's committed turns against its client's count, stuck sessions, and the
invariants the soak fails on.

Stuck: once every request has ended and the settle period has passed, each session that still exists
(GET answers 200) gets a 1-token probe turn; one that answers 409 session_busy for `stuck_after`
seconds is stuck.
The turn counts are read before the probes.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from .clients import Attempt, Conversation, SoakClient
from .faults import Injector


@dataclass
class SessionCheck:
    id: str
    acked: int
    in_doubt: int
    turns: int | None
    """`turns` from GET /v1/sessions/{id}; None when it answered 404 or never answered."""
    exists: bool | None
    """GET answered 200 (True) or 404 (False); None: it never answered."""
    deleted: bool | None
    lost: int = 0
    phantom: int = 0
    unacked_commits: int = 0
    """Turns the client saw fail that were committed all the same (allowed: they were in doubt)."""
    still_present: bool = False
    """Deleted, yet GET still finds it."""
    stuck: bool = False


async def read_turns(client: SoakClient, conv: Conversation, deadline: float) -> tuple[bool | None, int]:
    """(exists, committed turns) of the session, retrying server failures until `deadline`."""
    while client.ctx.now() < deadline:
        a = client._attempt(conv, "get")
        url = client.base_url(a)
        try:
            if url is None:
                raise httpx.ConnectError("no replica is up")
            r = await client.http.get(f"{url}/v1/sessions/{conv.id}")
            a.outcome = str(r.status_code)
            a.end = client.ctx.now()
            if r.status_code == 404:
                return False, 0
            if r.status_code == 200:
                return True, int(r.json()["turns"])
        except httpx.HTTPError as e:
            a.outcome, a.end = type(e).__name__, client.ctx.now()
        await asyncio.sleep(0.5)
    return None, 0


async def probe_stuck(client: SoakClient, conv: Conversation, stuck_after: float) -> bool:
    """True if the session answers 409 busy for `stuck_after` seconds to a client with nothing in flight."""
    deadline = client.ctx.now() + stuck_after
    while True:
        a = await client.turn(conv, probe=True)
        if a.outcome != "409":
            return False
        if client.ctx.now() > deadline:
            return True
        await asyncio.sleep(0.5)


async def check_sessions(clients: list[SoakClient], stuck_after: float) -> list[SessionCheck]:
    deadline = clients[0].ctx.now() + 30 if clients else 0.0
    pairs = [(c, conv) for c in clients for conv in c.conversations if conv.acked or conv.in_doubt]
    turns = await asyncio.gather(*(read_turns(c, conv, deadline) for c, conv in pairs))
    checks: list[SessionCheck] = []
    for (_, conv), (exists, t) in zip(pairs, turns, strict=True):
        check = SessionCheck(conv.id, conv.acked, conv.in_doubt, t if exists else None, exists, conv.deleted)
        if conv.deleted:
            check.still_present = bool(exists)
            check.lost = conv.lost_before_delete
        elif exists is not None and not (conv.deleted is None and not exists):
            # (a DELETE whose answer never came may have landed: then 404 is right)
            check.lost = max(0, conv.acked - t)
            extra = max(0, t - conv.acked)
            check.unacked_commits = min(extra, conv.in_doubt)
            check.phantom = extra - check.unacked_commits
        checks.append(check)
    live = [(c, conv, ch) for (c, conv), ch in zip(pairs, checks, strict=True) if ch.exists]
    stuck = await asyncio.gather(*(probe_stuck(c, conv, stuck_after) for c, conv, _ in live))
    for (_, _, check), s in zip(live, stuck, strict=True):
        check.stuck = s
    return checks


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_growth(samples: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, float]]:
    """Per server process, once it has served for `warmup` seconds (its first requests allocate the batch
    buffers): median RSS of the third and of the last quarter of its samples, and the growth between them
    (MiB). A leak grows through the end; a step from a load shift (a replica's clients moving to another
    during the faults, which happen in the first 70% of the run) does not count. Samples exist only while
    a process is healthy."""
    born: dict[str, float] = {}
    by_pid: dict[str, list[float]] = {}
    for s in samples:
        key = f"{s['replica']}/{s['pid']}"
        if s["t"] - born.setdefault(key, s["t"]) >= warmup:
            by_pid.setdefault(key, []).append(s["rss_mb"])
    out: dict[str, dict[str, float]] = {}
    for key, values in by_pid.items():
        if len(values) < 8:
            continue  # a restarted process's short life says nothing about a trend
        n = len(values)
        third, last = statistics.median(values[n // 2 : 3 * n // 4]), statistics.median(values[3 * n // 4 :])
        out[key] = {
            "start_mb": values[0],
            "third_quarter_mb": third,
            "last_quarter_mb": last,
            "growth_mb": last - third,
            "peak_mb": max(values),
        }
    return out


def unexpected_4xx(a: Attempt) -> bool:
    """A refusal a well-formed soak request never deserves (a 404 is expected only from DELETE and GET)."""
    return a.outcome in ("400", "401", "413", "422") or (
        a.outcome == "404" and a.kind not in ("delete", "get")
    )


def invariants(
    attempts: list[Attempt],
    checks: list[SessionCheck],
    injector: Injector,
    rss: dict[str, dict[str, float]],
    rss_limit_mb: float,
) -> list[dict[str, Any]]:
    """Each invariant: name, observed value, limit, ok."""
    unexpected = [a for a in attempts if a.server_failure and not injector.in_outage(a.start, a.end)]
    four = [a for a in attempts if unexpected_4xx(a)]
    no_retry = [a for a in attempts if a.outcome == "503" and not a.retry_after]
    held = [a for a in attempts if any(o.holds(a.start, a.answered or a.end) for o in injector.outages)]
    rows = [
        (
            "unexpected server failures (5xx, error events, broken/refused connections outside outages)",
            len(unexpected),
            0,
        ),
        (
            "lost turns (acked by the client, missing from the session's turns)",
            sum(c.lost for c in checks),
            0,
        ),
        ("phantom turns (committed though disconnected or refused)", sum(c.phantom for c in checks), 0),
        ("stuck sessions (409 busy with no request in flight)", sum(c.stuck for c in checks), 0),
        ("sessions unreadable after the run", sum(c.exists is None for c in checks), 0),
        ("deleted sessions still present", sum(c.still_present for c in checks), 0),
        ("unexpected 4xx (400/401/404/413/422 on well-formed requests)", len(four), 0),
        ("error answers not in OpenAI's format", sum(a.bad_error_body for a in attempts), 0),
        ("503 answers without Retry-After", len(no_retry), 0),
        ("requests held through a Redis freeze (no answer until it ended)", len(held), 0),
        ("faults that could not be injected", len(injector.failures), 0),
    ]
    out = [{"invariant": n, "value": v, "limit": lim, "ok": v <= lim} for n, v, lim in rows]
    growth = max((r["growth_mb"] for r in rss.values()), default=None)
    out.append(
        {
            "invariant": "server RSS growth over the last half of the run, MiB",
            "value": "n/a" if growth is None else round(growth, 1),  # a remote server, or none lived long
            "limit": rss_limit_mb,
            "ok": growth is None or growth <= rss_limit_mb,
        }
    )
    return out


def summary(attempts: list[Attempt], checks: list[SessionCheck]) -> dict[str, Any]:
    turns = [a for a in attempts if a.kind not in ("delete", "get", "probe")]
    ttft = [a.ttft for a in turns if a.ttft is not None]
    itl = [g for a in turns for g in a.itl]
    return {
        "requests": len(attempts),
        "turns_sent": len(turns),
        "turns_acked": sum(a.acked for a in turns),
        "disconnects": sum(a.outcome == "disconnect" for a in turns),
        "deletes": sum(a.kind == "delete" for a in attempts),
        "sessions": len(checks),
        "unacked_commits": sum(c.unacked_commits for c in checks),
        "answers": dict(sorted(Counter(a.outcome for a in attempts).items())),
        "ttft_s": {f"p{q}": pct(ttft, q / 100) for q in (50, 90, 99)},
        "itl_s": {f"p{q}": pct(itl, q / 100) for q in (50, 90, 99)},
    }
