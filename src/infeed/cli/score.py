"""``infeed score``: score one topic into another with a model from the registry, exactly once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from infeed.cli._shared import BrokerOption, err, fail, plural, state

__all__ = ["score"]


def score(
    ctx: typer.Context,
    in_topic: Annotated[str, typer.Option("--in", help="The topic of records to score.")],
    out_topic: Annotated[str, typer.Option("--out", help="Where the scores go.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model's name in the registry.")],
    registry_dir: Annotated[Path, typer.Option(help="The model registry folder.")],
    schema_file: Annotated[
        Path | None, typer.Option("--schema", metavar="SCHEMA.json", help="Validate input records.")
    ] = None,
    group: Annotated[str | None, typer.Option(help="Consumer group (default infeed.score.<out>).")] = None,
    inputs: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Record field(s) given to the model.")
    ] = None,
    id_field: Annotated[str | None, typer.Option(help="A record field copied to each score.")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Rows per model call, at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="How long a batch waits to fill.")] = 5.0,
    version: Annotated[int | None, typer.Option(min=0, help="Score with this version only.")] = None,
    partitions: Annotated[
        list[int] | None, typer.Option("--partition", help="Input partition(s) to score (default all).")
    ] = None,
    out_partition: Annotated[int, typer.Option(min=0, help="The output partition this scorer writes.")] = 0,
    follow: Annotated[bool, typer.Option(help="Load announced versions (unless --version).")] = True,
    events_topic: Annotated[
        str, typer.Option(help="Where new versions are announced.")
    ] = "infeed.model-events",
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    idle_exit_s: Annotated[
        float | None, typer.Option(min=0.0, help="Exit after this long with nothing to score.")
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Score the records of one topic into another: no record lost or scored twice, even on SIGKILL.

    Each output message is a record batch with the input's position (input, record), the model
    version and the outputs; it also records how far the input is done, so a restarted scorer
    resumes exactly there. Needs a log broker (seek + replay). Ctrl-C or SIGTERM stops after the
    current batch.
    """
    from infeed.codecs import Schema
    from infeed.errors import ConfigError, SchemaError, UnsupportedOperationError
    from infeed.inference import BatchConfig, ModelRegistry, ScoreConfig, Scorer

    if not (registry_dir / model).is_dir():
        raise fail(f"no model {model!r} in registry {registry_dir}; publish a version first")
    try:
        schema = Schema.load(schema_file) if schema_file is not None else None
        config = ScoreConfig(
            batch=BatchConfig(max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000.0),
            inputs=tuple(inputs or ("x",)),
            id_field=id_field,
            schema=schema,
            group=group,
            partitions=tuple(partitions) if partitions else None,
            out_partition=out_partition,
            version=version,
            events_topic=events_topic if follow else None,
            torch_threads=threads,
        )
    except (OSError, SchemaError, ValueError) as exc:
        raise fail(str(exc)) from exc
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with state(ctx).connect(broker) as connection:
        try:
            scorer = Scorer(
                connection,
                ModelRegistry(registry_dir),
                model,
                in_topic=in_topic,
                out_topic=out_topic,
                config=config,
            )
        except (UnsupportedOperationError, ConfigError, LookupError, ValueError) as exc:
            raise fail(str(exc)) from exc
        with scorer:
            where = ", ".join(f"{p}:{o}" for p, o in sorted(scorer.frontier.items()))
            err().print(
                f"scoring {in_topic} -> {out_topic} with {model} version {scorer.models.current} "
                f"from partition:offset {where}"
            )
            idle_since = time.monotonic()
            while not stop.is_set():
                if scorer.run_once(timeout_s=0.5):
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
    err().print(f"scored {plural(scorer.scored, 'record')}; dead-lettered {scorer.dead_lettered} message(s)")
