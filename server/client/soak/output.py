"""The soak's report: rich tables, the JSON file, and a PNG of RSS, answers and TTFT over time (outages
shaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streaming_core.report import fmt, new_figure, print_table, save_figure

from .clients import Attempt


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def print_report(result: dict[str, Any]) -> None:
    s = result["summary"]
    rows = [
        ("requests", s["requests"]),
        ("turns sent / acked", f"{s['turns_sent']} / {s['turns_acked']}"),
        ("disconnects / deletes", f"{s['disconnects']} / {s['deletes']}"),
        ("sessions checked", s["sessions"]),
        ("commits the client saw fail (in doubt)", s["unacked_commits"]),
        ("TTFT p50 / p90 / p99 ms", " / ".join(ms(s["ttft_s"][k]) for k in ("p50", "p90", "p99"))),
        ("ITL p50 / p90 / p99 ms", " / ".join(ms(s["itl_s"][k]) for k in ("p50", "p90", "p99"))),
        *((f"answers {k}", v) for k, v in s["answers"].items()),
    ]
    faults = ",".join(result["faults"]) or "none"
    caption = f"{result['duration_s']:.0f} s, {result['streams']} streams, faults: {faults}"
    print_table("soak", ["what", "value"], rows, caption)
    outages = [(o["kind"], o["start"], o["end"], o["allowance"]) for o in result["outages"]]
    if outages:
        print_table("declared outages (s since start)", ["fault", "start", "end", "allowance"], outages)
    table = Table(title="invariants")
    for col in ("invariant", "value", "limit", "result"):
        table.add_column(col, justify="left" if col == "invariant" else "right")
    for inv in result["invariants"]:
        verdict = "[green]ok[/green]" if inv["ok"] else "[bold red]FAIL[/bold red]"
        table.add_row(inv["invariant"], fmt(inv["value"]), fmt(inv["limit"]), verdict)
    Console().print(table)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def plot(result: dict[str, Any], attempts: list[Attempt], path: Path) -> None:
    fig, (rss_ax, ans_ax, ttft_ax) = new_figure(3, width=6.0)
    for ax in (rss_ax, ans_ax, ttft_ax):
        for o in result["outages"]:
            ax.axvspan(o["start"], o["end"] + o["allowance"], color="tab:red", alpha=0.12, lw=0)
    series: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for sample in result["rss"]:
        xs, ys = series.setdefault((sample["replica"], sample["pid"]), ([], []))
        xs.append(sample["t"])
        ys.append(sample["rss_mb"])
    colors: dict[str, str] = {}  # one colour and one legend entry per replica, whatever its restarts
    for (replica, _), (xs, ys) in series.items():
        first = replica not in colors
        colors.setdefault(replica, f"C{len(colors)}")
        rss_ax.plot(xs, ys, color=colors[replica], label=replica if first else None)
    rss_ax.set(xlabel="s", ylabel="MiB", title="server RSS (a new line per restart)")
    if series:
        rss_ax.legend(fontsize="small")
    groups = {
        "acked": "tab:green",
        "refused 4xx": "tab:orange",
        "server failure": "tab:red",
        "disconnect": "tab:gray",
    }
    for name, color in groups.items():
        pts = [(a.end, float(a.client)) for a in attempts if _group(a) == name]
        if pts:
            ans_ax.scatter(*zip(*pts, strict=True), s=6, color=color, label=name)
    ans_ax.set(xlabel="s (answer time)", ylabel="client", title="answers (outages shaded)")
    ans_ax.legend(fontsize="small")
    ttft = [(a.start, a.ttft * 1e3) for a in attempts if a.ttft is not None]
    if ttft:
        ttft_ax.scatter(*zip(*ttft, strict=True), s=6)
    ttft_ax.set(xlabel="s (request start)", ylabel="ms", title="time to first token", yscale="log")
    save_figure(fig, path)


def _group(a: Attempt) -> str:
    if a.acked:
        return "acked"
    if a.outcome == "disconnect":
        return "disconnect"
    if a.server_failure:
        return "server failure"
    return "refused 4xx" if a.outcome.startswith("4") else "other"
