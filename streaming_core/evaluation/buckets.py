"""Perplexity per fixed-size bucket of a long stream: a table and a plot that show it staying flat."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from ..report import new_figure, print_table


def bucket_ppl(nll: torch.Tensor, size: int) -> list[float]:
    """Perplexity of each run of `size` scored tokens (the last bucket may be shorter)."""
    if size < 1:
        raise ValueError(f"bucket size must be >= 1, got {size}")
    return [float(torch.exp(part.mean())) for part in nll.split(size)]


def print_bucket_table(buckets: dict[str, list[float]], size: int) -> None:
    modes = list(buckets)
    rows = [
        [f"{i * size}-{i * size + size}", *(buckets[m][i] if i < len(buckets[m]) else "" for m in modes)]
        for i in range(max(len(b) for b in buckets.values()))
    ]
    print_table(f"perplexity per {size}-token bucket", ["scored tokens", *modes], rows)


def plot_buckets(buckets: dict[str, list[float]], size: int, title: str) -> Figure:
    """Perplexity of each bucket against the bucket's start in the stream, one line per mode (log y)."""
    fig, (ax,) = new_figure(width=9.0)
    for mode, values in buckets.items():
        starts = [i * size for i in range(len(values))]
        ax.plot(starts, values, marker=".", label=f"{mode} (first {values[0]:.2f}, last {values[-1]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"perplexity of the bucket ({size} tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig
