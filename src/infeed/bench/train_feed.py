"""Figures 2 and 3, feed efficiency and checkpoint cost: ``mlp-784`` training fed from a topic.

Samples/s of ``mlp-784`` (Linear 784-256-ReLU-256-ReLU-10, Adam 1e-3, cross-entropy, batch 256, one
torch thread) fed by ``QueueDataset`` under the ``Trainer`` (exactly-once checkpoints on) ÷ the same
loop over tensors already in memory, each repetition paired with its own baseline. The topic is
filled before the clock starts, as record batches of 64 and as one record per message. Beside it:
the two hand-written loops people write today — poll a batch from the broker consumer, decode,
stack, step (ack each batch); and one message at a time — and figure 3, the same infeed run with a
checkpoint every ``CHECKPOINT_EVERY_STEPS`` steps ÷ one with a checkpoint only at the end.

A run's clock starts when the first batch is in hand and stops after the last step (the Trainer's
final checkpoint is not counted; intermediate ones are): steady-state training. The time from
before subscribing to the first batch is reported apart as ``startup_s``. Stall share is the time
steps waited for data ÷ (waiting + compute). Peak RSS is the kernel's high-water mark of the process
over the run (reset as it starts) minus the resident set then, plus the peak of its children (a
dataset's feed process): nothing samples it, so measuring costs the run nothing (Linux only; omitted
elsewhere). CPU per sample counts the feed process too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from infeed.bench import _feed_loops as loops
from infeed.bench import harness
from infeed.bench._feed_loops import BATCH
from infeed.bench._proc_cpu import broker_pids, tree_cpu_s
from infeed.bench.brokers import DEFAULT_BROKERS_FILE, Backend, discover
from infeed.brokers import Broker, connect
from infeed.types import Capability

__all__ = ["BATCH", "CHECKPOINT_EVERY_STEPS", "DEFAULT_STEPS", "TARGETS", "VARIANTS", "cli", "run"]

#: Steps per run (the topic holds ``steps * BATCH`` records).
DEFAULT_STEPS = 150
#: Steps of the one-message-at-a-time loop (a shorter run: it is slow on every backend).
ONE_AT_A_TIME_STEPS = 16
#: Figure 3's checkpoint interval, in steps.
CHECKPOINT_EVERY_STEPS = 10
#: Figure 2's targets (ratio to the in-memory loop) per packing; figure 3's largest cost.
TARGETS = {"rb64": 0.95, "rb1": 0.9, "checkpoint_cost": 0.03}

#: name -> (packing: records per message or 0 for in-memory tensors, description)
VARIANTS: dict[str, tuple[int, str]] = {
    "tensors": (0, "the same loop over tensors already in memory (the baseline)"),
    "infeed rb64": (64, "QueueDataset + Trainer, record batches of 64, checkpoint at the end"),
    "infeed rb64 thread": (64, "as infeed rb64, the prefetch thread in the training process"),
    f"infeed rb64 ckpt/{CHECKPOINT_EVERY_STEPS}": (
        64,
        f"as infeed rb64, plus a checkpoint every {CHECKPOINT_EVERY_STEPS} steps (figure 3)",
    ),
    "hand poll rb64": (64, "hand-written: receive 4 messages, decode, concatenate, step, ack"),
    "infeed rb1": (1, "QueueDataset + Trainer, one record per message"),
    "infeed rb1 thread": (1, "as infeed rb1, the prefetch thread in the training process"),
    "hand poll rb1": (1, "hand-written: receive 256 messages, decode each, stack, step, ack"),
    "hand one-at-a-time rb1": (1, "hand-written: receive and decode one message at a time, ack each"),
}


def _measure(
    name: str,
    broker: Broker,
    topics: dict[int, str],
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    group: str,
    workdir: Path,
) -> loops.Run:
    packing = VARIANTS[name][0]
    if packing == 0:
        return loops.tensors(x, y)
    topic = topics[packing]
    if name.startswith("infeed"):
        if not broker.supports(Capability.SEEK):
            return loops.infeed_stream(broker, topic, group, len(x))
        every = CHECKPOINT_EVERY_STEPS if "ckpt/" in name else None
        return loops.infeed(
            broker, topic, group, every, workdir, "thread" if name.endswith("thread") else "auto"
        )
    if "one-at-a-time" in name:  # slow everywhere: a shorter run measures its rate as well
        return loops.hand(broker, topic, group, min(len(x), ONE_AT_A_TIME_STEPS * BATCH), 1)
    return loops.hand(broker, topic, group, len(x), BATCH // packing)


def _bench_backend(
    backend: Backend,
    url: str | None,
    names: Sequence[str],
    steps: int,
    repetitions: int,
    workdir: Path,
    say: Callable[[str], None],
    brokers_file: Path,
) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(784)
    n = steps * BATCH
    x = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n, dtype=np.int64)
    run_id = uuid.uuid4().hex[:8]
    # The broker's own processes (none for in-process backends); RabbitMQ's stream model: the same.
    pids = [] if backend.embedded else broker_pids(backend.name.removesuffix("-stream"), brokers_file)
    if backend.scheme == "sqlite":
        broker = connect(f"sqlite:///{workdir / run_id}.db")
    else:
        broker = connect(url or "memory://")
    if not broker.supports(Capability.SEEK):
        # No exact resume there: the Trainer refuses to checkpoint, so figure 3 has nothing to measure.
        names = [v for v in names if "ckpt/" not in v]
        say(f"  {backend.name}: no SEEK: infeed runs QueueDataset without the Trainer; no checkpoint variant")
    runs: dict[str, list[loops.Run]] = {name: [] for name in names}

    def group_of(rep: int, name: str) -> str:
        return f"g{rep}-{name.replace(' ', '-').replace('/', '')}"

    try:
        topics = {}
        for packing in sorted({VARIANTS[v][0] for v in names} - {0}):
            topics[packing] = f"train-feed-{run_id}-rb{packing}"
            broker.create_topic(topics[packing], partitions=1)
            if not broker.supports(Capability.REPLAY):  # a queue routes only to groups that exist
                for rep in range(repetitions):
                    for name in names:
                        if VARIANTS[name][0] == packing:
                            broker.subscribe(topics[packing], group=group_of(rep, name)).close()
            loops.fill(broker, topics[packing], x, y, packing)
        say(f"  {backend.name}: {n:,} samples ({steps} steps of {BATCH}) x {repetitions} repetitions")
        _measure("tensors", broker, topics, x[: BATCH * 4], y[: BATCH * 4], "warm", workdir)  # warm-up
        for rep in range(repetitions):
            order = list(names) if rep % 2 == 0 else list(reversed(names))
            for name in order:
                before = tree_cpu_s(pids)
                done = _measure(name, broker, topics, x, y, group_of(rep, name), workdir)
                if pids:
                    done.broker_cpu_s = tree_cpu_s(pids) - before
                runs[name].append(done)
        for topic in topics.values():
            with contextlib.suppress(Exception):
                broker.delete_topic(topic)
    finally:
        broker.close()
    base = [r.rate for r in runs["tensors"]]
    base_cpu = [r.cpu_s / r.samples * 1e6 for r in runs["tensors"]]
    out: dict[str, dict[str, Any]] = {}
    for name, reps in runs.items():
        rates = [r.rate for r in reps]
        ratios = harness.paired_ratios(rates, base)
        stalls = [r.stall for r in reps if r.stall is not None]
        rss = [r.rss_peak_bytes for r in reps if r.rss_peak_bytes is not None]
        cpu = [r.cpu_s / r.samples * 1e6 for r in reps]
        broker_cpu = [r.broker_cpu_s / r.samples * 1e6 for r in reps if r.broker_cpu_s is not None]
        out[name] = {
            "description": VARIANTS[name][1],
            "records_per_message": VARIANTS[name][0] or None,
            "samples_per_s": {"reps": rates, **harness.summarize(rates)},
            "ratio_to_tensors": {"reps": ratios, **harness.summarize(ratios)},
            "cpu_us_per_sample": {"reps": cpu, **harness.summarize(cpu)},
            "feed_cpu_us_per_sample": harness.summarize([c - b for c, b in zip(cpu, base_cpu, strict=True)]),
            "broker_cpu_us_per_sample": harness.summarize(broker_cpu) if broker_cpu else None,
            "stall_share": harness.summarize(stalls) if stalls else None,
            "rss_peak_growth_bytes": max(rss) if rss else None,
            "startup_s": harness.summarize([r.startup_s for r in reps]),
        }
    ckpt = f"infeed rb64 ckpt/{CHECKPOINT_EVERY_STEPS}"
    if ckpt in runs and "infeed rb64" in runs:
        cost = [
            1 - r
            for r in harness.paired_ratios(
                [r.rate for r in runs[ckpt]], [r.rate for r in runs["infeed rb64"]]
            )
        ]
        out[ckpt]["checkpoint_cost"] = harness.summarize(cost)
        each = [r.checkpoint_each_s for r in runs[ckpt] if r.checkpoint_each_s is not None]
        if each:
            seconds = harness.summarize(each)
            out[ckpt]["checkpoint_seconds_each"] = seconds
            # Figure 3's target is at one checkpoint every 30 s: the measured seconds per checkpoint
            # over 30 s of training (the run here is too short to hold one every 30 s).
            out[ckpt]["projected_cost_every_30s"] = {k: v / 30.0 for k, v in seconds.items()}
    return out


def _modes(
    chosen: list[tuple[Backend, str | None]], skipped: list[dict[str, str]]
) -> tuple[list[tuple[Backend, str | None]], list[dict[str, str]]]:
    """RabbitMQ twice: its queue model (classic queues, no seek) and its stream model."""
    out: list[tuple[Backend, str | None]] = []
    for backend, url in chosen:
        out.append((backend, url))
        if backend.scheme == "amqp" and url is not None and "queue_type=" not in url:
            stream = dataclasses.replace(backend, name=f"{backend.name}-stream")
            out.append((stream, f"{url}{'&' if '?' in url else '?'}queue_type=stream"))
    return out, skipped


def run(
    *,
    backends: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    repetitions: int = harness.DEFAULT_REPETITIONS,
    out_dir: Path = harness.DEFAULT_OUT_DIR,
    brokers_file: Path = DEFAULT_BROKERS_FILE,
    console: Console | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Measure figures 2 and 3; write ``train_feed.json`` (and ``.png``) to ``out_dir``; print a table.

    Args:
        backends: only these backends (default: memory, sqlite and every real broker that is up).
        variants: only these variants (names of ``VARIANTS``; the baseline is always measured).
        steps: steps per run (``steps * 256`` records per topic).
        repetitions: runs per variant (BENCHMARKS.md wants at least 3).
        out_dir: where the JSON and PNG go.
        brokers_file: the state file of scripts/brokers.
        console: where the table and progress go.
        plot: also write the PNG.

    Returns:
        what was written to ``train_feed.json``.

    Raises:
        ValueError: an unknown backend or variant, or a bad count.
    """
    if steps < 1 or repetitions < 1:
        raise ValueError(f"steps and repetitions must be >= 1, got {steps} and {repetitions}")
    for name in variants or ():
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    names = ["tensors", *(v for v in (variants or VARIANTS) if v != "tensors")]
    import torch

    console = console or harness.wide_console()
    chosen, skipped = _modes(*discover(backends, brokers_file))
    for skip in skipped:
        console.print(f"[yellow]skip[/] {skip['backend']}: {skip['reason']}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    info = harness.machine_info(("torch", "numpy", "psutil"))
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="infeed-train-feed-") as tmp:
            for backend, url in chosen:
                console.print(f"[bold]{backend.name}[/] ({url or backend.scheme + '://'})")
                try:
                    results[backend.name] = _bench_backend(
                        backend, url, names, steps, repetitions, Path(tmp), console.print, brokers_file
                    )
                except Exception as exc:  # one broken backend must not cost the others' numbers
                    reason = f"failed: {type(exc).__name__}: {exc}"
                    console.print(f"[red]skip[/] {backend.name}: {reason}")
                    skipped.append({"backend": backend.name, "reason": reason})
    finally:
        torch.set_num_threads(threads)
    info["load_average_end"] = harness.load_average()
    data = {
        "figure": "train_feed",
        "title": "Feed efficiency: mlp-784 samples/s fed from a topic ÷ over tensors in memory (same run)",
        "targets": TARGETS,
        "method": {
            "workload": "mlp-784: Linear 784-256-ReLU-256-ReLU-10, Adam 1e-3, cross-entropy, batch 256",
            "torch_threads": 1,
            "samples_per_run": steps * BATCH,
            "repetitions": repetitions,
            "order": "variants alternate direction each repetition; ratios pair each run with its baseline",
            "clock": "from the first batch in hand to the end of the last step (final checkpoint excluded); "
            "startup_s: from before subscribing to the first batch in hand",
            "consumer": "QueueDataset's prefetch thread in a feed process where the broker allows it "
            "(a log that several processes may share), else in the training process; the 'thread' "
            "variants keep it in the training process everywhere",
            "cpu": "CPU time of the process (every thread) and of its feed process over the clocked span "
            "per sample; +feed: minus the "
            "paired in-memory run's (what feeding costs; on a loaded machine the rate ratio can only "
            "be as good as tensors CPU / variant CPU)",
            "broker_cpu": "CPU time of the broker's processes (scripts/brokers' pids and their children) "
            "over the whole run, subscribing and startup included, per sample; none for in-process "
            "backends. Here the broker shares the cores with the step: with the step on one core, the "
            "feed process and the broker share the other",
        },
        "machine": info,
        "variants": {name: VARIANTS[name][1] for name in names},
        "skipped": skipped,
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    harness.write_json(out_dir / "train_feed.json", data)
    _print(data, console)
    if plot:
        _plot(data, out_dir / "train_feed.png")
    console.print(
        f"wrote {out_dir / 'train_feed.json'}" + (f" and {out_dir / 'train_feed.png'}" if plot else "")
    )
    return data


def _print(data: dict[str, Any], console: Console) -> None:
    rows = []
    for backend, variants in data["results"].items():
        for name, r in variants.items():
            rate, ratio, stall = r["samples_per_s"], r["ratio_to_tensors"], r["stall_share"]
            cpu, feed = r["cpu_us_per_sample"], r["feed_cpu_us_per_sample"]
            cost = r.get("checkpoint_cost")
            projected = r.get("projected_cost_every_30s")
            rss = r["rss_peak_growth_bytes"]
            rows.append(
                [
                    backend,
                    name,
                    str(r["records_per_message"] or "-"),
                    f"{rate['median']:,.0f} ({rate['min']:,.0f}-{rate['max']:,.0f})",
                    f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})",
                    f"{stall['median']:.1%}" if stall else "-",
                    f"{cpu['median']:.1f}" + (f" (+{feed['median']:.1f})" if name != "tensors" else ""),
                    f"{broker['median']:.1f}" if (broker := r.get("broker_cpu_us_per_sample")) else "-",
                    f"{cost['median']:+.1%} (30 s: {projected['median']:.2%})" if cost and projected else "-",
                    f"{rss / 2**20:.0f} MiB" if rss is not None else "-",
                    f"{r['startup_s']['median'] * 1000:.0f} ms",
                ]
            )
    harness.print_table(
        data["title"],
        [
            "backend",
            "variant",
            "rec/msg",
            "samples/s median (min-max)",
            "÷ tensors",
            "stall",
            "CPU µs/sample (+feed)",
            "broker µs/sample",
            "ckpt cost",
            "peak RSS +",
            "startup",
        ],
        rows,
        console=console,
        caption=f"targets: infeed rb64 >= {TARGETS['rb64']}, infeed rb1 >= {TARGETS['rb1']}, "
        f"checkpoint cost <= {TARGETS['checkpoint_cost']:.0%} (at one every 30 s; here every "
        f"{CHECKPOINT_EVERY_STEPS} steps). Shared, noisy machine: read the ratios, not the rates.",
    )


def _plot(data: dict[str, Any], path: Path) -> None:
    backends = list(data["results"])
    names = [n for n in data["variants"] if n != "tensors"]
    series = {
        name: [
            harness.Bar(r["median"], r["min"], r["max"])
            if (r := data["results"][b].get(name, {}).get("ratio_to_tensors"))
            else None
            for b in backends
        ]
        for name in names
    }
    harness.plot_grouped_bars(
        path,
        backends,
        series,
        title="mlp-784 samples/s ÷ the same loop over tensors in memory",
        ylabel="ratio (1 = no feed cost)",
        target=TARGETS["rb64"],
    )


def cli(
    backend: Annotated[
        list[str] | None, typer.Option("--backend", "-b", help="Only this backend (repeatable).")
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help=f"Only this variant (repeatable): {', '.join(VARIANTS)}."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Steps of 256 samples per run.")] = DEFAULT_STEPS,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Runs per variant.")] = (
        harness.DEFAULT_REPETITIONS
    ),
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the JSON and PNG results.")
    ] = harness.DEFAULT_OUT_DIR,
    brokers_file: Annotated[Path, typer.Option("--brokers-file", help="State file of scripts/brokers.")] = (
        DEFAULT_BROKERS_FILE
    ),
) -> None:
    """Figures 2 and 3: mlp-784 fed by QueueDataset ÷ over tensors in memory; checkpoint cost."""
    try:
        run(
            backends=backend,
            variants=variant,
            steps=steps,
            repetitions=repetitions,
            out_dir=out,
            brokers_file=brokers_file,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
