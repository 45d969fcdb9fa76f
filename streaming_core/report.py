"""Output shared by the eval and bench commands: a rich table, one final JSON line, CSV, PNG figures.

Figures use matplotlib's object API (no pyplot, no global backend state): `Figure.savefig` renders with
Agg, so nothing needs a display.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with `digits` significant decimals, everything else as str."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
) -> None:
    table = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    Console().print(table)


def print_json(obj: Any) -> None:
    """One line, printed last, so that `... --json | tail -n 1` is machine-readable."""
    print(json.dumps(obj, sort_keys=False), flush=True)


def write_csv(path: Path | str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def new_figure(panels: int = 1, width: float = 7.0, height: float = 4.5) -> tuple[Figure, list[Any]]:
    """A figure with `panels` side-by-side axes."""
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    return fig, axes


def save_figure(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
