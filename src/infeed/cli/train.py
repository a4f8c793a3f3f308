"""``infeed train``: train a model from a topic with exactly-once checkpoints and a live display."""

from __future__ import annotations

import enum
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from infeed.cli._shared import BrokerOption, err, fail, out, state

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from infeed.training import QueueDataset, StepInfo, Trainer, TrainResult

__all__ = ["DEFAULT_CHECKPOINT_EVERY_S", "DEFAULT_PROGRESS_TOPIC", "Loss", "train"]

#: Checkpoint interval when neither --checkpoint-every-steps nor --checkpoint-every-s is given.
DEFAULT_CHECKPOINT_EVERY_S = 30.0
#: Where ``infeed train`` publishes its progress events.
DEFAULT_PROGRESS_TOPIC = "infeed.training-progress"
#: Under torchrun: how long a rank waits for its batch each step (``Trainer.starve_wait_s``).
DEFAULT_STARVE_WAIT_S = 0.05
#: Redraws of the live display per second, at most.
_REDRAWS_PER_S = 4.0


class Loss(enum.StrEnum):
    """``--loss``."""

    cross_entropy = "cross-entropy"
    mse = "mse"


def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", metavar="MODULE:FACTORY", help="Builds the model.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic of training records.")],
    schema_file: Annotated[Path, typer.Option("--schema", metavar="SCHEMA.json", help="Field specs.")],
    checkpoint_dir: Annotated[Path, typer.Option("--checkpoint-dir", help="Checkpoint folder.")],
    group: Annotated[str, typer.Option("--group", "-g", help="Consumer group.")] = "train",
    batch_size: Annotated[int, typer.Option(min=1, help="Records per step.")] = 256,
    checkpoint_every_steps: Annotated[
        int | None, typer.Option(min=1, help="Checkpoint every N steps.")
    ] = None,
    checkpoint_every_s: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help=f"Checkpoint every S seconds [default: {DEFAULT_CHECKPOINT_EVERY_S:g} "
            "unless --checkpoint-every-steps].",
        ),
    ] = None,
    max_samples: Annotated[int | None, typer.Option(min=0, help="Stop after this many records.")] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Passes over the topic as it stands [default: an endless stream]."),
    ] = None,
    registry_dir: Annotated[
        Path | None, typer.Option(help="Publish each checkpoint as a model version here.")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="The model's name in the registry.")] = None,
    model_kwargs: Annotated[
        str, typer.Option(metavar="JSON", help="Keyword arguments of the factory.")
    ] = "{}",
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    loss: Annotated[Loss, typer.Option(help="Loss function.")] = Loss.cross_entropy,
    input_field: Annotated[str, typer.Option(help="Field fed to the model.")] = "x",
    target_field: Annotated[str, typer.Option(help="Field the loss compares with.")] = "y",
    shuffle_buffer: Annotated[int, typer.Option(min=0, help="Records held back to shuffle among.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the model's initial weights and of the shuffle.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads [default: torch's].")] = None,
    deterministic: Annotated[
        bool, typer.Option(help="Deterministic kernels (torch.use_deterministic_algorithms).")
    ] = False,
    idle_timeout_s: Annotated[
        float | None, typer.Option(min=0.001, help="Stop when nothing arrives for this long.")
    ] = None,
    events_topic: Annotated[
        str, typer.Option(help="Where new versions are announced.")
    ] = "infeed.model-events",
    progress_topic: Annotated[
        str | None,
        typer.Option(help="Where a JSON progress event goes after each checkpoint ('' for none)."),
    ] = DEFAULT_PROGRESS_TOPIC,
    audit_field: Annotated[
        str | None,
        typer.Option(help="Keep this field of every trained record in each checkpoint (audits)."),
    ] = None,
    starve_wait_s: Annotated[
        float,
        typer.Option(min=0.0, help="Under torchrun: how long a rank waits for its batch each step."),
    ] = DEFAULT_STARVE_WAIT_S,
    broker: BrokerOption = None,
) -> None:
    """Train a model on a topic; checkpoints are exactly once with respect to the stream.

    A restart with the same --checkpoint-dir resumes where the last checkpoint stopped. Ctrl-C stops
    after the current step and checkpoints. Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set)
    every rank reads its share of the partitions and DDP all-reduces the gradients.
    """
    import torch

    from infeed.brokers import connect
    from infeed.codecs import Schema
    from infeed.inference.registry import resolve_factory
    from infeed.training import ModelRegistry, QueueDataset, Trainer, TrainingMetrics
    from infeed.training.distributed import DistContext, assign_partitions

    try:
        kwargs = json.loads(model_kwargs)
    except ValueError as exc:
        raise fail(f"--model-kwargs is not JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise fail(f"--model-kwargs must be a JSON object, got {model_kwargs}")
    if registry_dir is not None and not model_name:
        raise fail("--registry-dir needs --model-name")
    if checkpoint_every_steps is None and checkpoint_every_s is None:
        checkpoint_every_s = DEFAULT_CHECKPOINT_EVERY_S
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    schema = Schema.load(schema_file)
    torch.manual_seed(seed)
    net = resolve_factory(model)(**kwargs)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = (
        torch.nn.functional.cross_entropy if loss is Loss.cross_entropy else torch.nn.functional.mse_loss
    )
    url = state(ctx).settings(broker).broker
    group_ctx = DistContext.from_env()
    main = group_ctx is None or group_ctx.is_main
    display = _Display(err(), classify=loss is Loss.cross_entropy)
    bus = connect(url)
    partitions = None
    if group_ctx is not None:
        n_partitions = len(bus.describe_topic(topic).partitions)
        partitions = assign_partitions(n_partitions, group_ctx.rank, group_ctx.world_size)
    with (
        bus,
        QueueDataset(
            bus,
            topic,
            partitions=partitions,
            group=group,
            schema=schema,
            batch_size=batch_size,
            epochs=epochs,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            idle_timeout_s=idle_timeout_s,
        ) as dataset,
    ):
        trainer = Trainer(
            net,
            optimizer,
            loss_fn,
            dataset,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every_steps=checkpoint_every_steps,
            checkpoint_every_s=checkpoint_every_s,
            max_samples=max_samples,
            input_field=input_field,
            target_field=target_field,
            registry=ModelRegistry(registry_dir) if registry_dir is not None else None,
            model_name=model_name,
            model_factory=model,
            model_kwargs=kwargs,
            events_topic=events_topic,
            metrics=TrainingMetrics(),
            on_step=display.step if main else None,
            on_checkpoint_phase=display.phase if main else None,
            distributed=group_ctx,
            progress_topic=progress_topic or None,
            audit_field=audit_field,
            starve_wait_s=starve_wait_s,
        )
        display.attach(trainer, dataset)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: trainer.stop())
        try:
            resumed = trainer.restore()
            if resumed is not None and main:
                err().print(f"resumed from the checkpoint after step {resumed:,}")
            if group_ctx is not None and main:
                err().print(
                    f"rank 0 of {group_ctx.world_size} ({group_ctx.backend}); partitions {partitions}"
                )
            if main:
                with display:
                    result = trainer.fit()
            else:
                result = trainer.fit()
        finally:
            signal.signal(signal.SIGINT, previous)
            if group_ctx is not None:
                group_ctx.close()
    if main:
        _summary(result, checkpoint_dir)


class _Display:
    """A rich live table of the run (on a terminal); a line per checkpoint elsewhere."""

    def __init__(self, console: Console, *, classify: bool) -> None:
        self.console = console
        self.classify = classify
        self.trainer: Trainer | None = None
        self.dataset: QueueDataset | None = None
        self.live: Any = None
        self.started = time.monotonic()
        self.redrawn = 0.0
        self.lag_at = -1e9
        self.lag = 0
        self.loss_avg: float | None = None
        self.acc_avg: float | None = None
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.samples_at_start: int | None = None
        self.checkpoints = 0
        self.checkpoint_ms = 0.0
        self.checkpoint_began = 0.0

    def attach(self, trainer: Trainer, dataset: QueueDataset) -> None:
        self.trainer, self.dataset = trainer, dataset

    def __enter__(self) -> _Display:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(None, None, None)

    def step(self, info: StepInfo) -> None:
        if self.samples_at_start is None:
            self.samples_at_start = info.samples - info.batch_size
            self.started = time.monotonic() - info.data_wait_s - info.compute_s
        self.loss_avg = info.loss if self.loss_avg is None else 0.95 * self.loss_avg + 0.05 * info.loss
        if self.classify and info.outputs.ndim == 2 and len(info.targets):
            acc = float((info.outputs.argmax(1) == info.targets).float().mean())
            self.acc_avg = acc if self.acc_avg is None else 0.95 * self.acc_avg + 0.05 * acc
        self.wait_s += info.data_wait_s
        self.compute_s += info.compute_s
        now = time.monotonic()
        if self.live is not None and now - self.redrawn >= 1.0 / _REDRAWS_PER_S:
            self.redrawn = now
            self.live.update(self._table(), refresh=True)

    def phase(self, phase: str, step: int) -> None:
        if phase == "begin":
            self.checkpoint_began = time.monotonic()
        elif phase == "end":
            self.checkpoints += 1
            self.checkpoint_ms = (time.monotonic() - self.checkpoint_began) * 1000
            if self.live is None:
                self.console.print(
                    f"checkpoint after step {step:,} ({self.checkpoint_ms:.0f} ms); {self._line()}"
                )

    def _rate(self) -> float:
        if self.trainer is None or self.samples_at_start is None:
            return 0.0
        return (self.trainer.samples - self.samples_at_start) / max(time.monotonic() - self.started, 1e-9)

    def _line(self) -> str:
        loss = f"{self.loss_avg:.4f}" if self.loss_avg is not None else "-"
        acc = f", accuracy {self.acc_avg:.1%}" if self.acc_avg is not None else ""
        return f"loss {loss}{acc}, {self._rate():,.0f} samples/s"

    def _table(self) -> Table:
        from rich.table import Table

        now = time.monotonic()
        if self.dataset is not None and now - self.lag_at >= 2.0:
            self.lag_at, self.lag = now, self.dataset.lag()
        t = self.trainer
        busy = self.wait_s + self.compute_s
        table = Table(title="infeed train", show_header=False, min_width=48)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("step", f"{t.step:,}" if t else "-")
        table.add_row("samples", f"{t.samples:,}" if t else "-")
        table.add_row("samples/s", f"{self._rate():,.0f}")
        table.add_row("loss (avg)", f"{self.loss_avg:.4f}" if self.loss_avg is not None else "-")
        if self.classify:
            table.add_row("accuracy (avg)", f"{self.acc_avg:.1%}" if self.acc_avg is not None else "-")
        table.add_row("data stall", f"{self.wait_s / busy:.1%}" if busy else "-")
        table.add_row("consumer lag", f"{self.lag:,} messages")
        table.add_row("epoch", f"{self.dataset.epoch}" if self.dataset else "-")
        table.add_row("checkpoints", f"{self.checkpoints} (last {self.checkpoint_ms:.0f} ms)")
        table.add_row("dead-lettered", f"{self.dataset.dead_lettered:,}" if self.dataset else "-")
        return table


def _summary(result: TrainResult, checkpoint_dir: Path) -> None:
    console = out()
    resumed = f", resumed from step {result.resumed_from:,}" if result.resumed_from is not None else ""
    console.print(
        f"trained {result.steps_run:,} steps this run "
        f"({result.steps:,} in all, {result.samples:,} samples{resumed}); "
        f"last loss {result.last_loss:.4f}; data stall {result.data_stall_share:.1%}; "
        f"{result.checkpoints} checkpoints ({result.checkpoint_s:.2f} s) in {checkpoint_dir}; "
        f"{result.dead_lettered:,} dead-lettered",
        markup=False,
        soft_wrap=True,
    )
