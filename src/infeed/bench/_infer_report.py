"""Figures 4 and 5: the printed tables and the plots of ``infer.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from infeed.bench import harness

__all__ = ["TARGETS", "draw", "print_tables"]

#: Figure 4's speedup over ``max_batch_size=1``; figure 5's largest p50 overhead (ms) on sqlite and redis.
TARGETS = {"batching_speedup": 5.0, "latency_overhead_p50_ms": 0.3}


def _range(s: dict[str, float], fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def print_tables(data: dict[str, Any], console: Console) -> None:
    """Print figure 4's and figure 5's tables."""
    rows = []
    for backend, r in data["results"].items():
        t = r["throughput"]
        for size, s in t["sizes"].items():
            speedup = t["speedup_vs_batch1"].get(size)
            rows.append(
                [
                    backend,
                    size,
                    f"{s['requests']:,}",
                    _range(s["requests_per_s"], ",.0f"),
                    _range(speedup, ".1f") + "x" if speedup else "-",
                    f"{s['model_rows_per_s']['median']:,.0f}",
                    _range(s["fraction_of_model"], ".2f"),
                ]
            )
    harness.print_table(
        "Figure 4: req-784 requests/s at saturation through the queue (one worker)",
        [
            "backend",
            "max_batch",
            "requests",
            "req/s median (min-max)",
            "÷ max_batch 1",
            "model rows/s",
            "÷ model",
        ],
        rows,
        console=console,
        caption=f"target: ÷ max_batch 1 >= {TARGETS['batching_speedup']:g}x. "
        "÷ model: the fraction of mlp-784's own in-process rows/s at that batch size. "
        "Shared, noisy machine: read the ratios.",
    )
    rows = []
    for backend, r in data["results"].items():
        for variant, s in r["latency"]["variants"].items():
            rows.append(
                [
                    backend,
                    variant,
                    _range(s["p50"], ".2f"),
                    _range(s["p99"], ".2f"),
                    _range(s["p50_added"], "+.2f") if "p50_added" in s else "-",
                    _range(s["p99_added"], "+.2f") if "p99_added" in s else "-",
                ]
            )
    harness.print_table(
        "Figure 5: request-reply latency at low load (one client, sequential), ms",
        ["backend", "variant", "p50 ms", "p99 ms", "p50 added vs raw", "p99 added vs raw"],
        rows,
        console=console,
        caption=f"target: p50 added <= {TARGETS['latency_overhead_p50_ms']} ms on sqlite and redis. "
        "raw: the engine's own client, the responder running the same model on the same bytes.",
    )


def draw(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``infer.png`` (figure 4's speedups) and ``infer_latency.png`` (figure 5's added latency).

    Returns:
        The files written (no ``infer_latency.png`` when no backend had a raw baseline).
    """
    backends = list(data["results"])
    sizes = sorted(
        {s for r in data["results"].values() for s in r["throughput"]["speedup_vs_batch1"]}, key=int
    )
    series = {
        f"max_batch_size {size} ÷ 1": [
            harness.Bar(v["median"], v["min"], v["max"])
            if (v := data["results"][b]["throughput"]["speedup_vs_batch1"].get(size))
            else None
            for b in backends
        ]
        for size in sizes
    }
    written = [
        harness.plot_grouped_bars(
            out_dir / "infer.png",
            backends,
            series,
            title="req-784 requests/s with dynamic batching ÷ max_batch_size=1",
            ylabel="speedup",
            target=TARGETS["batching_speedup"],
        )
    ]
    with_raw = [b for b in backends if data["results"][b]["latency"]["raw"]]  # an overhead needs a baseline
    variants = sorted({v for r in data["results"].values() for v in r["latency"]["variants"] if v != "raw"})
    lat_series = {
        f"{variant} {q}": [
            harness.Bar(a["median"], a["min"], a["max"])
            if (a := data["results"][b]["latency"]["variants"].get(variant, {}).get(f"{q}_added"))
            else None
            for b in with_raw
        ]
        for variant in variants
        for q in ("p50", "p99")
    }
    if with_raw:
        written.append(
            harness.plot_grouped_bars(
                out_dir / "infer_latency.png",
                with_raw,
                lat_series,
                title="request-reply latency added by infeed over the raw client (ms)",
                ylabel="ms added",
                target=TARGETS["latency_overhead_p50_ms"],
            )
        )
    return written
