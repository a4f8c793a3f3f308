"""``infeed bench``: a typer app mounted as ``bench`` (brokers, train-feed, infer, train-dist, all).

Run it alone with ``python -m infeed.bench.cli brokers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infeed.bench import brokers as figure_brokers
from infeed.bench import harness

__all__ = ["app"]

app = typer.Typer(
    help="Measure infeed against raw clients (BENCHMARKS.md); writes bench/results/*.json and *.png.",
    no_args_is_help=True,
    add_completion=False,
)

BackendOpt = Annotated[
    list[str] | None,
    typer.Option("--backend", "-b", help="Only this backend (repeatable): memory, sqlite, redis, ..."),
]
PayloadOpt = Annotated[
    list[str] | None,
    typer.Option("--payload", "-p", help="Only this workload (repeatable): msg-1k, sample-784."),
]
RepsOpt = Annotated[
    int, typer.Option("--repetitions", "-r", min=1, help="Rounds per side, each on a fresh topic.")
]
MessagesOpt = Annotated[
    int | None,
    typer.Option("--messages", "-n", min=1, help="Messages per round (default: sized to --seconds)."),
]
SecondsOpt = Annotated[
    float, typer.Option("--seconds", min=0.05, help="Target seconds of the slowest measurement of a round.")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the JSON and PNG results.")]
BrokersFileOpt = Annotated[Path, typer.Option("--brokers-file", help="State file of scripts/brokers.")]


@app.command("brokers")
def brokers(
    backend: BackendOpt = None,
    payload: PayloadOpt = None,
    repetitions: RepsOpt = harness.DEFAULT_REPETITIONS,
    messages: MessagesOpt = None,
    seconds: SecondsOpt = figure_brokers.DEFAULT_SECONDS,
    out: OutOpt = harness.DEFAULT_OUT_DIR,
    brokers_file: BrokersFileOpt = figure_brokers.DEFAULT_BROKERS_FILE,
) -> None:
    """Figure 1: infeed produce and consume+ack msgs/s ÷ the raw client's, per backend."""
    try:
        figure_brokers.run(
            backends=backend,
            payloads=payload,
            repetitions=repetitions,
            messages=messages,
            seconds=seconds,
            out_dir=out,
            brokers_file=brokers_file,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


app.command("train-feed")(__import__("infeed.bench.train_feed", fromlist=["cli"]).cli)
app.command("infer")(__import__("infeed.bench.infer", fromlist=["cli"]).cli)
app.command("train-dist")(__import__("infeed.bench.train_dist", fromlist=["cli"]).cli)


@app.command("all")
def all_figures(
    repetitions: RepsOpt = harness.DEFAULT_REPETITIONS,
    out: OutOpt = harness.DEFAULT_OUT_DIR,
    brokers_file: BrokersFileOpt = figure_brokers.DEFAULT_BROKERS_FILE,
) -> None:
    """Every figure: brokers (1), train-feed (2), infer (4, 5), train-dist; each with its defaults."""
    from infeed.bench import infer, train_dist, train_feed

    figure_brokers.run(repetitions=repetitions, out_dir=out, brokers_file=brokers_file)
    train_feed.cli(repetitions=repetitions, out=out, brokers_file=brokers_file)
    infer.cli(repetitions=repetitions, out=out, brokers_file=brokers_file)
    train_dist.cli(repetitions=repetitions, out=out)


if __name__ == "__main__":
    app()
