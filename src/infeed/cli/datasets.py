"""``infeed datasets``: small real datasets that ship inside packages, produced into a topic.

``digits`` is scikit-learn's bundled 8x8 digits (1,797 samples; nothing is downloaded), read by the
demo's fast loader: ``x`` float32 (64,) scaled to [0, 1], ``y`` int64 label, ``id`` int64 sample id.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from infeed.cli._shared import BrokerOption, out, plural, state

__all__ = ["DIGITS_SCHEMA", "Dataset", "app"]

#: The schema of the ``digits`` records.
DIGITS_SCHEMA: dict[str, dict[str, Any]] = {
    "x": {"dtype": "float32", "shape": [64]},
    "y": {"dtype": "int64", "shape": []},
    "id": {"dtype": "int64", "shape": []},
}

app = typer.Typer(help="Small real datasets (shipped inside packages) into a topic.", no_args_is_help=True)


class Dataset(enum.StrEnum):
    """The datasets known."""

    digits = "digits"


@app.command("schema")
def schema(name: Annotated[Dataset, typer.Argument(help="The dataset.")] = Dataset.digits) -> None:
    """Print the dataset's schema as JSON (what --schema of infeed train and produce read)."""
    out().print_json(json.dumps(DIGITS_SCHEMA))


@app.command("produce")
def produce(
    ctx: typer.Context,
    name: Annotated[Dataset, typer.Argument(help="The dataset.")] = Dataset.digits,
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to write to.")] = "digits",
    records_per_message: Annotated[int, typer.Option(min=1, help="Records per message.")] = 64,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the topic if it is created.")] = 1,
    repeat: Annotated[int, typer.Option(min=1, help="Write the dataset this many times.")] = 1,
    schema_out: Annotated[
        Path | None, typer.Option("--schema-out", metavar="FILE", help="Also write the schema here.")
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Write a dataset into a topic as record batches (and print how to train on it)."""
    import numpy as np

    from infeed.cli._digits import load_digits
    from infeed.codecs import RecordBatch, Schema
    from infeed.streams import Producer

    x, y = load_digits()
    n = len(x)
    batch = RecordBatch(
        {"x": (x / 16.0).astype(np.float32), "y": y.astype(np.int64), "id": np.arange(n, dtype=np.int64)}
    )
    with state(ctx).connect(broker) as b:
        if topic not in b.list_topics():
            b.create_topic(topic, partitions=partitions)
        with Producer(
            b, topic, schema=Schema.from_dict(DIGITS_SCHEMA), records_per_message=records_per_message
        ) as p:
            for _ in range(repeat):
                p.send_batch(batch)
    if schema_out is not None:
        schema_out.write_text(json.dumps(DIGITS_SCHEMA, indent=1) + "\n", encoding="utf-8")
    console = out()
    console.print(
        f"{name.value}: {plural(n * repeat, 'record')} in {plural(p.messages_sent, 'message')} to {topic}",
        markup=False,
    )
    kwargs = json.dumps({"in_features": 64, "hidden": [64], "out_features": 10})
    console.print(
        f"train on it: infeed train --model infeed.training.models:mlp --model-kwargs '{kwargs}' "
        f"--topic {topic} --schema {schema_out or 'digits.schema.json'} --checkpoint-dir ./ckpt "
        "--epochs 20 --batch-size 64",
        markup=False,
        soft_wrap=True,
    )
