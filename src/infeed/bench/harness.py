"""What every benchmark shares: timing, min/median/max, machine facts, the JSON, the table, the plot.

BENCHMARKS.md is the method: a figure is a ratio measured side by side in the same run, over at
least 3 repetitions, summarized as min / median / max. Timings use ``time.perf_counter``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEFAULT_REPETITIONS",
    "Bar",
    "wide_console",
    "load_average",
    "machine_info",
    "paired_ratios",
    "plot_grouped_bars",
    "print_table",
    "summarize",
    "timed",
    "write_json",
]

#: Where ``make bench`` writes its JSON and PNG files (relative to the working directory).
DEFAULT_OUT_DIR = Path("bench/results")
#: Repetitions of every measurement (BENCHMARKS.md asks for at least 3).
DEFAULT_REPETITIONS = 3


def timed(fn: Callable[[], object]) -> float:
    """Run ``fn`` once and return the seconds it took (``time.perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return ``{"min", "median", "max"}`` of ``values``.

    Raises:
        ValueError: if ``values`` is empty.
    """
    if not values:
        raise ValueError("cannot summarize no values")
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Return ``numerators[i] / denominators[i]``: each repetition against its own neighbour.

    Raises:
        ValueError: if the lengths differ or a denominator is not positive.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"cannot pair {len(numerators)} values with {len(denominators)}")
    for d in denominators:
        if not d > 0:
            raise ValueError(f"a ratio needs positive denominators, got {d}")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def load_average() -> list[float] | None:
    """Return the 1/5/15-minute load averages (a noise indicator), or None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Return the facts a reader needs to judge a result: CPUs, Python, client versions, time.

    Args:
        packages: distribution names whose installed versions to record (None: not installed).
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "sqlite": sqlite3.sqlite_version,
        "versions": {name: _version(name) for name in ("infeed", *packages)},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON to ``path`` (creating its folder) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def wide_console() -> Console:
    """Return a console for tables: the terminal's width, and at least 132 columns off a terminal."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=max(132, plain.width))


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    console: Console | None = None,
    caption: str | None = None,
) -> Table:
    """Print a rich table (numbers right-aligned) and return it."""
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    (console or wide_console()).print(table)
    return table


@dataclass(frozen=True)
class Bar:
    """One bar of a grouped bar plot: a median with its min-max range."""

    median: float
    low: float
    high: float


def plot_grouped_bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[Bar | None]],
    *,
    title: str,
    ylabel: str,
    target: float | None = None,
) -> Path:
    """Draw one group of bars per entry of ``groups`` (a series per legend entry) into a PNG.

    Args:
        path: the PNG to write (its folder is created).
        groups: the x-axis groups.
        series: legend entry -> one bar per group (None: no bar there).
        title: the plot title.
        ylabel: the y-axis label.
        target: draw a dashed horizontal line at this value.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2.0), 4.5))
    try:
        width = 0.8 / max(1, len(series))
        for k, (label, bars) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i, bar in enumerate(bars) if bar is not None]
            shown = [bar for bar in bars if bar is not None]
            heights = [b.median for b in shown]
            errors = [[b.median - b.low for b in shown], [b.high - b.median for b in shown]]
            ax.bar(xs, heights, width, label=label, yerr=errors, capsize=3)
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
