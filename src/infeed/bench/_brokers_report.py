"""Figure 1's result rows, printed table and plot, from the timings ``infeed.bench.brokers`` takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from infeed.bench import harness
from infeed.bench.payloads import Payload

__all__ = ["plot", "print_table", "rows"]


def _stats(count: int, seconds: list[float]) -> dict[str, Any]:
    rates = [count / s for s in seconds]
    return {"seconds": seconds, "msgs_per_s": rates, "summary": harness.summarize(rates)}


def rows(
    backend: str,
    load: Payload,
    count: int,
    times: dict[str, dict[str, list[float]]],
    labels: dict[str, str],
    raw_ops: Mapping[str, Sequence[str]],
    target: float,
) -> list[dict[str, Any]]:
    """Return the result rows (produce, consume) of one backend and payload from the timings.

    ``raw_ops`` maps ``produce`` and ``consume`` to the raw side's variants of each; where there
    are several, the fastest of each repetition is the baseline of that repetition.
    """
    out = []
    for op in ("produce", "consume"):
        infeed = _stats(count, times["infeed"][op])
        raw: dict[str, Any] | None = None
        ratio: dict[str, Any] | None = None
        verdict = "no baseline"
        if "raw" in times:
            variants = {v: _stats(count, times["raw"][v]) for v in raw_ops[op]}
            best_rates = [
                max(reps) for reps in zip(*(v["msgs_per_s"] for v in variants.values()), strict=True)
            ]
            best_variant = max(variants, key=lambda v: variants[v]["summary"]["median"])
            raw = {
                "label": labels["raw"],
                "best_variant": best_variant,
                "msgs_per_s": best_rates,
                "summary": harness.summarize(best_rates),
                "variants": variants,
            }
            reps = harness.paired_ratios(infeed["msgs_per_s"], best_rates)
            ratio = {"reps": reps, **harness.summarize(reps)}
            verdict = "meets" if ratio["median"] >= target else "below"
        out.append(
            {
                "backend": backend,
                "payload": load.name,
                "payload_bytes": len(load.data),
                "op": op,
                "messages": count,
                "infeed": {"label": labels["infeed"], **infeed},
                "raw": raw,
                "ratio": ratio,
                "target": target,
                "verdict": verdict,
            }
        )
    return out


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def print_table(data: Mapping[str, Any], console: Console) -> None:
    """Print the figure-1 table of ``data`` (as written to brokers.json)."""
    rows = []
    for r in data["results"]:
        raw, ratio = r["raw"], r["ratio"]
        raw_text = "—"
        if raw:
            raw_text = _rate(raw["summary"]["median"])
            if len(raw["variants"]) > 1:
                raw_text += f" ({raw['best_variant'].partition('-')[2] or raw['best_variant']})"
        rows.append(
            [
                r["backend"],
                r["payload"],
                "produce" if r["op"] == "produce" else "consume+ack",
                _rate(r["infeed"]["summary"]["median"]),
                raw_text,
                f"{ratio['median']:.2f}" if ratio else "—",
                f"{ratio['min']:.2f}-{ratio['max']:.2f}" if ratio else "—",
                f"{r['target']:g}",
                r["verdict"] if ratio else "—",
            ]
        )
    machine = data["machine"]
    caption = (
        f"medians of {data['method']['repetitions']} repetitions; msgs/s; "
        f"{machine['cpus_usable']} CPUs, load {machine['load_average']} → {machine['load_average_end']}"
    )
    for skip in data["skipped"]:
        caption += f"\nskipped {skip['backend']}: {skip['reason']}"
    harness.print_table(
        "Figure 1 — broker overhead (infeed ÷ raw client)",
        ["backend", "payload", "op", "infeed msgs/s", "raw msgs/s", "ratio", "min-max", "target", "verdict"],
        rows,
        console=console,
        caption=caption,
    )


def plot(data: Mapping[str, Any], path: Path) -> None:
    """Draw the ratios of ``data`` as grouped bars (one group per backend) with the target line."""
    with_ratio = [r for r in data["results"] if r["ratio"]]
    groups = list(dict.fromkeys(r["backend"] for r in with_ratio))
    series: dict[str, list[harness.Bar | None]] = {}
    for r in with_ratio:
        label = f"{r['payload']} {'produce' if r['op'] == 'produce' else 'consume+ack'}"
        bars = series.setdefault(label, [None] * len(groups))
        ratio = r["ratio"]
        bars[groups.index(r["backend"])] = harness.Bar(ratio["median"], ratio["min"], ratio["max"])
    harness.plot_grouped_bars(
        path,
        groups,
        series,
        title="infeed ÷ raw client msgs/s (median, min-max)",
        ylabel="ratio",
        target=data["target_ratio"],
    )
