"""``infeed bench train-dist``: samples/s of ``mlp-784`` trained by a ``torchrun`` group of 1 and 2 ranks.

Every repetition trains the same records (``sample-784``, 64 per record batch, in a SQLite topic of
``--partitions`` partitions, a fresh consumer group per run) with exactly-once group checkpoints
on; once by one rank, once by two. Each rank times its own steps from the end of the first one
to the end of ``fit()`` (process start, imports, rendezvous and first-step costs are out) and
reports its records, compute and data-wait seconds. The group figure is all records ÷ the
slowest rank's seconds. Beside it, in the same repetition, the same model over tensors already
in memory in this process (one torch thread, as every rank uses) gives the baseline the ratios
are taken against.

Writes ``bench/results/train_dist.json`` and ``.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from infeed.bench import harness

__all__ = ["DEFAULT_PARTITIONS", "DEFAULT_SAMPLES", "WORLDS", "cli", "run"]

#: Records trained per run (by the whole group).
DEFAULT_SAMPLES = 32_768
#: Partitions of the topic (ranks split them p % world).
DEFAULT_PARTITIONS = 4
#: World sizes measured.
WORLDS = (1, 2)
BATCH = 256
PER_MESSAGE = 64
_TOPIC = "bench-train-dist"


def _schema() -> Any:
    from infeed.codecs import Field, Schema

    return Schema({"x": Field("float32", (784,)), "y": Field("int64")})


def _produce(url: str, samples: int, partitions: int) -> None:
    from infeed.brokers import connect
    from infeed.codecs import RecordBatch
    from infeed.streams import Producer

    rng = np.random.default_rng(0)
    with connect(url) as broker:
        broker.create_topic(_TOPIC, partitions=partitions)
        with Producer(broker, _TOPIC, records_per_message=PER_MESSAGE, messages_per_publish=64) as producer:
            for start in range(0, samples, 4096):
                n = min(4096, samples - start)
                producer.send_batch(
                    RecordBatch(
                        {
                            "x": rng.random((n, 784), dtype=np.float32),
                            "y": rng.integers(0, 10, n, dtype=np.int64),
                        }
                    )
                )


def rank_main(argv: list[str]) -> int:
    """One rank of a measured run (started by torchrun); writes ``OUT/rank-R.json``."""
    import argparse

    import torch

    from infeed.training import QueueDataset, StepInfo, Trainer
    from infeed.training.distributed import DistContext, assign_partitions
    from infeed.training.models import mlp_784

    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ctx = DistContext.from_env()
    if ctx is None:
        raise SystemExit("run under torchrun")
    torch.manual_seed(0)
    model = mlp_784()
    first: list[float] = []
    local = [0]
    first_compute, first_wait = [0.0], [0.0]

    def on_step(info: StepInfo) -> None:
        # The clock starts after the first step: it pays one-off costs (the optimizer's lazy
        # imports, DDP's first bucket build) that a long run never sees again.
        if not first:
            first.append(time.perf_counter())
            first_compute[0], first_wait[0] = info.compute_s, info.data_wait_s
            return
        local[0] += len(info.targets)

    out = Path(args.out)
    with QueueDataset(
        args.broker,
        _TOPIC,
        group=args.group,
        schema=_schema(),
        batch_size=BATCH,
        epochs=1,
        partitions=assign_partitions(args.partitions, ctx.rank, ctx.world_size),
    ) as ds:
        trainer = Trainer(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-3),
            torch.nn.functional.cross_entropy,
            ds,
            checkpoint_dir=out / "ckpt",
            checkpoint_every_s=30.0,
            distributed=ctx,
            on_step=on_step,
        )
        result = trainer.fit()
    end = time.perf_counter()
    report = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "samples": local[0],
        "group_samples": result.samples,
        "steps": result.steps,
        "seconds": end - first[0] if first else 0.0,
        "compute_s": result.compute_s - first_compute[0],
        "data_wait_s": result.data_wait_s - first_wait[0],
        "checkpoint_s": result.checkpoint_s,
    }
    (out / f"rank-{ctx.rank}.json").write_text(json.dumps(report))
    ctx.close()
    return 0


def _in_memory(samples: int) -> float:
    """samples/s of the same model over tensors in memory, one torch thread (the baseline)."""
    import torch

    from infeed.training.models import mlp_784

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = mlp_784()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(samples, 784)
        y = torch.randint(0, 10, (samples,))
        start = time.perf_counter()
        for i in range(0, samples, BATCH):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH])
            torch.autograd.backward(loss)
            optimizer.step()
        return samples / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _group_run(url: str, world: int, partitions: int, work: Path) -> list[dict[str, Any]]:
    out = work / f"run-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += ["-m", "infeed.bench.train_dist", "rank", "--broker", url, "--group", out.name]
    command += ["--partitions", str(partitions), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun of {world} ranks failed ({done.returncode}):\n{done.stdout[-2000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def run(*, samples: int, partitions: int, repetitions: int, out_dir: Path) -> dict[str, Any]:
    """Measure, print a table, write the JSON and PNG; return the JSON's data."""
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="infeed-bench-dist-") as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work}/bench.db"
        _produce(url, samples, partitions)
        for rep in range(repetitions):
            baseline = _in_memory(min(samples, 16_384))
            entry: dict[str, Any] = {"repetition": rep, "in_memory_samples_per_s": baseline, "worlds": {}}
            for world in WORLDS:
                ranks = _group_run(url, world, partitions, work)
                slowest = max(r["seconds"] for r in ranks)
                total = sum(r["samples"] for r in ranks)
                entry["worlds"][str(world)] = {
                    "samples_per_s": total / slowest,
                    "ratio_to_in_memory": total / slowest / baseline,
                    "ranks": [
                        {
                            **r,
                            "samples_per_s": r["samples"] / r["seconds"],
                            "compute_share": r["compute_s"] / r["seconds"],
                            "stall_share": r["data_wait_s"] / r["seconds"],
                        }
                        for r in ranks
                    ],
                }
            rounds.append(entry)
    summary: dict[str, Any] = {
        "in_memory_samples_per_s": harness.summarize([r["in_memory_samples_per_s"] for r in rounds])
    }
    for world in WORLDS:
        w = str(world)
        summary[w] = {
            "samples_per_s": harness.summarize([r["worlds"][w]["samples_per_s"] for r in rounds]),
            "ratio_to_in_memory": harness.summarize([r["worlds"][w]["ratio_to_in_memory"] for r in rounds]),
            "per_rank_samples_per_s": harness.summarize(
                [rk["samples_per_s"] for r in rounds for rk in r["worlds"][w]["ranks"]]
            ),
            "per_rank_compute_share": harness.summarize(
                [rk["compute_share"] for r in rounds for rk in r["worlds"][w]["ranks"]]
            ),
            "per_rank_stall_share": harness.summarize(
                [rk["stall_share"] for r in rounds for rk in r["worlds"][w]["ranks"]]
            ),
        }
    scaling = harness.paired_ratios(
        [r["worlds"]["2"]["samples_per_s"] for r in rounds],
        [r["worlds"]["1"]["samples_per_s"] for r in rounds],
    )
    summary["speedup_2_over_1"] = harness.summarize(scaling)
    data = {
        "figure": "train-dist",
        "workload": "mlp-784, batch 256 per rank, sample-784 in record batches of 64, SQLite, gloo",
        "samples": samples,
        "partitions": partitions,
        "repetitions": repetitions,
        "machine": harness.machine_info(("torch", "numpy")),
        "summary": summary,
        "rounds": rounds,
    }
    harness.write_json(out_dir / "train_dist.json", data)
    _report(summary, out_dir)
    return data


def _fmt(s: dict[str, float], digits: str = ",.0f") -> str:
    return f"{s['median']:{digits}} ({s['min']:{digits}}-{s['max']:{digits}})"


def _report(summary: dict[str, Any], out_dir: Path) -> None:
    rows = []
    for world in WORLDS:
        w = summary[str(world)]
        rows.append(
            [
                f"{world} rank{'s' if world > 1 else ''}",
                "sqlite",
                "mlp-784",
                _fmt(w["samples_per_s"]),
                _fmt(w["ratio_to_in_memory"], ".2f"),
                _fmt(w["per_rank_samples_per_s"]),
                _fmt(w["per_rank_compute_share"], ".0%"),
                _fmt(w["per_rank_stall_share"], ".0%"),
            ]
        )
    harness.print_table(
        "train-dist: samples/s, median (min-max)",
        ["world", "broker", "model", "group", "÷ in memory", "per rank", "compute", "stall"],
        rows,
        caption=f"in memory (1 thread): {_fmt(summary['in_memory_samples_per_s'])} samples/s; "
        f"2 ranks ÷ 1 rank: {_fmt(summary['speedup_2_over_1'], '.2f')}",
    )
    bars = {
        "group": [harness.Bar(**{k: summary[str(w)]["samples_per_s"][m] for k, m in _KEYS}) for w in WORLDS],
        "per rank": [
            harness.Bar(**{k: summary[str(w)]["per_rank_samples_per_s"][m] for k, m in _KEYS}) for w in WORLDS
        ],
    }
    harness.plot_grouped_bars(
        out_dir / "train_dist.png",
        [f"{w} rank{'s' if w > 1 else ''}" for w in WORLDS],
        bars,
        title="mlp-784 over a SQLite topic, torchrun + gloo",
        ylabel="samples/s",
    )


_KEYS = (("median", "median"), ("low", "min"), ("high", "max"))


def cli(
    samples: Annotated[int, typer.Option(min=BATCH, help="Records trained per run.")] = DEFAULT_SAMPLES,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the topic.")] = DEFAULT_PARTITIONS,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Runs per world size.")] = (
        harness.DEFAULT_REPETITIONS
    ),
    out: Annotated[Path, typer.Option("--out", help="Folder for the JSON and PNG results.")] = (
        harness.DEFAULT_OUT_DIR
    ),
) -> None:
    """Samples/s of mlp-784 trained by 1 and 2 torchrun ranks (gloo), group and per rank."""
    run(samples=samples, partitions=partitions, repetitions=repetitions, out_dir=out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["rank"]:
        sys.exit(rank_main(sys.argv[2:]))
    sys.exit("usage: python -m infeed.bench.train_dist rank ARGS (or: infeed bench train-dist)")
