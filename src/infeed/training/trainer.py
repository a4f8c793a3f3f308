"""``Trainer``: a training loop over a ``QueueDataset`` with exactly-once checkpoints.

The protocol (DESIGN.md, "Training: exactly once with respect to the model"), per checkpoint:

1. write model + optimizer + dataset state (+ trainer counters, RNG, audit) into a temporary
   folder, fsync every file and the folder, rename it into place, then repoint ``LATEST``
   atomically (``checkpoint.CheckpointStore``);
2. only then commit the dataset's positions to the broker (and, where the broker cannot seek,
   ack the messages the checkpoint covers);
3. then publish the weights as a model version and announce it on the model-events topic.

On start the checkpoint, not the broker, is the truth: the newest complete checkpoint is loaded
and the dataset seeks to its positions, skipping records before the saved record index. A run
killed at any moment and resumed ends with the same weights as one never killed (single
partition, deterministic kernels: ``torch.use_deterministic_algorithms(True)``, one thread).

In a group of ranks (``distributed=DistContext.from_env()``) the loop, checkpoint and restore are
``distributed_fit``'s: ranks step in lockstep, and one checkpoint holds every rank's positions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import load_model, save_model
from safetensors.torch import save as st_save

from infeed.codecs import JsonCodec
from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry, announce
from infeed.streams import Producer
from infeed.training._optim import optimizer_from_files, optimizer_to_files
from infeed.training.checkpoint import DEFAULT_KEEP, Checkpoint, CheckpointStore, FileSource
from infeed.training.dataset import QueueDataset
from infeed.training.distributed import DistContext, check_group_dataset
from infeed.training.metrics import TrainingMetrics
from infeed.training.state import decode_state, encode_state

__all__ = [
    "DEFAULT_LAG_EVERY_S",
    "DEFAULT_STARVE_WAIT_S",
    "TRAINER_FORMAT",
    "StepInfo",
    "TrainResult",
    "Trainer",
]

#: How often the consumer lag and the windowed rates are refreshed.
DEFAULT_LAG_EVERY_S = 2.0
#: In a group, how long a rank waits for its batch before the step goes on without it.
DEFAULT_STARVE_WAIT_S = 0.05
#: The ``format`` of ``trainer.json``.
TRAINER_FORMAT = "infeed.trainer/1"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one step did (handed to ``on_step``).

    Attributes:
        step: steps done so far (this one included).
        samples: records trained so far.
        batch_size: records in this step's batch.
        loss: this step's loss.
        data_wait_s: seconds this step waited for its batch.
        compute_s: seconds of forward, backward and optimizer step.
        outputs: the model's outputs (detached).
        targets: the batch's targets.
    """

    step: int
    samples: int
    batch_size: int
    loss: float
    data_wait_s: float
    compute_s: float
    outputs: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        steps: steps done in total (restored ones included).
        samples: records trained in total.
        resumed_from: the step of the checkpoint the run resumed from (None: a fresh start).
        steps_run: steps taken by this call.
        checkpoints: checkpoints written by this call.
        seconds: wall time of this call.
        data_wait_s: of which waiting for batches.
        compute_s: of which forward, backward and step.
        checkpoint_s: of which checkpointing.
        last_loss: the last step's loss (NaN if no step ran).
        dead_lettered: poison messages and records seen.
        finished: the dataset's last epoch ended.
    """

    steps: int
    samples: int
    resumed_from: int | None
    steps_run: int
    checkpoints: int
    seconds: float
    data_wait_s: float
    compute_s: float
    checkpoint_s: float
    last_loss: float
    dead_lettered: int
    finished: bool

    @property
    def data_stall_share(self) -> float:
        """Waiting for data ÷ (waiting + compute)."""
        busy = self.data_wait_s + self.compute_s
        return self.data_wait_s / busy if busy > 0 else 0.0


class Trainer:
    """Trains ``model`` on ``dataset`` and checkpoints it exactly once with respect to the stream.

    Each batch is a dict of tensors; the model gets ``batch[input_field]`` and the loss compares
    its output with ``batch[target_field]``.

    Args:
        model: the model.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        dataset: where batches come from (not closed by the trainer).
        checkpoint_dir: folder of the checkpoints.
        checkpoint_every_steps: checkpoint after this many steps (None: not by steps).
        checkpoint_every_s: checkpoint after this many seconds (None: not by time).
        keep_checkpoints: complete checkpoints kept.
        max_samples: stop once this many records were trained (over all runs).
        max_steps: stop after this many steps (over all runs).
        input_field: the batch field fed to the model.
        target_field: the batch field the loss compares with.
        registry: publish each checkpoint's weights here as version ``step``.
        model_name: the model's name in the registry (needed with ``registry``).
        model_factory: ``module:function`` that builds the model (needed with ``registry``).
        model_kwargs: the factory's keyword arguments (JSON-safe).
        events_topic: where versions are announced; None: do not announce.
        metrics: Prometheus metrics to keep up to date (None: none).
        audit_field: keep the values of this field of every trained record in each checkpoint
            (``audit.safetensors``; for exactly-once audits, e.g. of sample ids).
        on_step: called after each step.
        on_checkpoint_phase: called as ``(phase, step)`` at ``begin``, ``wrote:FILE``, ``written``,
            ``renamed``, ``latest``, ``committed``, ``announced`` and ``end`` of each checkpoint.
        lag_every_s: how often the consumer lag is measured.
        distributed: this rank's place in a ``torchrun`` group (``DistContext.from_env()``); the
            dataset must read ``assign_partitions(...)`` of the topic. None: train alone.
        progress_topic: after each checkpoint, publish a JSON progress event here (step, samples,
            loss, world size, every rank's positions); None: do not.
        starve_wait_s: in a group, how long a rank waits for its batch each step before the step
            goes on without it (its records stay held for a later step).

    Raises:
        ValueError: a bad interval or limit, a registry without model name and factory, or a group
            whose dataset cannot be split by partitions.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        dataset: QueueDataset,
        *,
        checkpoint_dir: str | Path,
        checkpoint_every_steps: int | None = None,
        checkpoint_every_s: float | None = None,
        keep_checkpoints: int = DEFAULT_KEEP,
        max_samples: int | None = None,
        max_steps: int | None = None,
        input_field: str = "x",
        target_field: str = "y",
        registry: ModelRegistry | None = None,
        model_name: str | None = None,
        model_factory: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        events_topic: str | None = DEFAULT_EVENTS_TOPIC,
        metrics: TrainingMetrics | None = None,
        audit_field: str | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        on_checkpoint_phase: Callable[[str, int], None] | None = None,
        lag_every_s: float = DEFAULT_LAG_EVERY_S,
        distributed: DistContext | None = None,
        progress_topic: str | None = None,
        starve_wait_s: float = DEFAULT_STARVE_WAIT_S,
    ) -> None:
        if checkpoint_every_steps is not None and checkpoint_every_steps <= 0:
            raise ValueError(f"checkpoint_every_steps must be > 0 or None, got {checkpoint_every_steps}")
        if checkpoint_every_s is not None and not checkpoint_every_s > 0:
            raise ValueError(f"checkpoint_every_s must be > 0 or None, got {checkpoint_every_s}")
        for name, limit in (("max_samples", max_samples), ("max_steps", max_steps)):
            if limit is not None and limit < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {limit}")
        dataset.require_seek()  # checkpoints are exact resume points: refuse before training
        if registry is not None and (not model_name or not model_factory):
            raise ValueError(
                "publishing to a registry needs model_name and model_factory ('module:function')"
            )
        for field in (input_field, target_field, audit_field):
            if field is not None and field not in dataset.schema.fields:
                raise ValueError(
                    f"field {field!r} is not in the dataset's schema ({', '.join(dataset.schema.fields)})"
                )
        if not starve_wait_s >= 0:
            raise ValueError(f"starve_wait_s must be >= 0, got {starve_wait_s}")
        if distributed is not None and distributed.world_size > 1:
            check_group_dataset(dataset)
        if distributed is not None:
            model.to(distributed.device)  # before the optimizer state is loaded, so it lands there too
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.store = CheckpointStore(checkpoint_dir, keep=keep_checkpoints)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_s = checkpoint_every_s
        self.max_samples = max_samples
        self.max_steps = max_steps
        self.input_field = input_field
        self.target_field = target_field
        self.registry = registry
        self.model_name = model_name
        self.model_factory = model_factory
        self.model_kwargs = dict(model_kwargs or {})
        self.events_topic = events_topic
        self.metrics = metrics
        self.audit_field = audit_field
        self.on_step = on_step
        self.on_checkpoint_phase = on_checkpoint_phase
        self.lag_every_s = lag_every_s
        self.distributed = distributed
        self.progress_topic = progress_topic
        self.starve_wait_s = starve_wait_s
        #: Steps done (restored ones included).
        self.step = 0
        #: Records trained (restored ones included).
        self.samples = 0
        self.last_loss = float("nan")
        self._checkpointed_step = -1
        self._restored: int | None = None
        self._restore_done = False
        self._audit: list[np.ndarray[Any, Any]] = []
        self._audit_steps: list[np.ndarray[Any, Any]] = []
        #: In a group, on rank 0: every trained record's audit value and step, as checkpointed.
        self._group_audit: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] = (
            np.empty(0, np.int64),
            np.empty(0, np.int64),
        )
        self._dead_seen = 0
        self._stop = threading.Event()

    # -- restore --------------------------------------------------------------------------------

    def restore(self) -> int | None:
        """Load the newest complete checkpoint, if any; return its step (None: fresh start).

        Also removes what a crash left in the checkpoint folder, and announces the restored
        version again (a crash may have come between the commit and the announcement).
        """
        if self._restore_done:
            return self._restored
        self._restore_done = True
        if self.distributed is not None:
            from infeed.training.distributed_fit import restore_group

            return restore_group(self)
        self.store.recover()
        found = self.store.latest()
        if found is None:
            return None
        self._load_common(found)
        self.dataset.load_state_dict(
            decode_state(found.read_bytes("dataset.json"), found.read_bytes("dataset.safetensors"))
        )
        if "audit.safetensors" in found:
            self._audit = [np_load(found.read_bytes("audit.safetensors"))["values"]]
        self._restored = self.step
        self._dead_seen = self.dataset.dead_lettered
        self._publish(found)
        return self.step

    def _load_common(self, found: Checkpoint) -> dict[str, Any]:
        """Load weights, optimizer, counters and RNG from ``found``; return ``trainer.json``."""
        load_model(self.model, str(found.path / "model.safetensors"))
        optimizer_from_files(
            self.optimizer, found.read_bytes("optimizer.safetensors"), found.read_bytes("optimizer.json")
        )
        meta: dict[str, Any] = json.loads(found.read_bytes("trainer.json"))
        if meta.get("format") != TRAINER_FORMAT:
            raise ValueError(
                f"{found.path}/trainer.json has format {meta.get('format')!r}, not {TRAINER_FORMAT!r}"
            )
        self.step, self.samples = int(meta["step"]), int(meta["samples"])
        self.last_loss = float(meta["last_loss"]) if meta.get("last_loss") is not None else float("nan")
        tensors = st_load(found.read_bytes("trainer.safetensors"))
        torch.set_rng_state(tensors["torch_rng"])
        self._checkpointed_step = self.step
        return meta

    # -- the loop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`fit` to stop after the current step (and checkpoint); safe from any thread."""
        self._stop.set()

    def _limit_reached(self) -> bool:
        return (
            self._stop.is_set()
            or (self.max_samples is not None and self.samples >= self.max_samples)
            or (self.max_steps is not None and self.step >= self.max_steps)
        )

    def fit(self) -> TrainResult:
        """Restore, then train until the dataset ends or a limit is reached; checkpoint at the end.

        Returns:
            What was done.
        """
        if self.distributed is not None:
            from infeed.training.distributed_fit import fit_group

            return fit_group(self)
        started = time.monotonic()
        self.restore()
        steps_run = checkpoints = 0
        wait_total = compute_total = checkpoint_total = 0.0
        window = _Window(time.monotonic())
        last_checkpoint = time.monotonic()
        # Inputs as views of the feed's ring where it can (no copy); not what outlives the step
        # (the audit keeps its field, on_step may keep the targets).
        batches = self.dataset.iter_lent({self.input_field} - {self.audit_field, self.target_field})
        self.model.train()
        while not self._limit_reached():
            t0 = time.monotonic()
            batch = next(batches, None)
            t1 = time.monotonic()
            if batch is None:
                break
            outputs, targets, loss = self._train_step(batch)
            t2 = time.monotonic()
            n = len(targets)
            self.step += 1
            self.samples += n
            self.last_loss = loss
            steps_run += 1
            wait_total += t1 - t0
            compute_total += t2 - t1
            window.add(n, t1 - t0, t2 - t1)
            if self.audit_field is not None:
                self._audit.append(batch[self.audit_field].numpy())
            self._observe(n, loss, t1 - t0, t2 - t1, window, t2)
            if self.on_step is not None:
                self.on_step(StepInfo(self.step, self.samples, n, loss, t1 - t0, t2 - t1, outputs, targets))
            due_steps = (
                self.checkpoint_every_steps is not None and self.step % self.checkpoint_every_steps == 0
            )
            due_time = self.checkpoint_every_s is not None and t2 - last_checkpoint >= self.checkpoint_every_s
            if due_steps or due_time:
                checkpoint_total += self._timed_checkpoint()
                checkpoints += 1
                last_checkpoint = time.monotonic()
        if self.step != self._checkpointed_step:
            checkpoint_total += self._timed_checkpoint()
            checkpoints += 1
        return TrainResult(
            steps=self.step,
            samples=self.samples,
            resumed_from=self._restored,
            steps_run=steps_run,
            checkpoints=checkpoints,
            seconds=time.monotonic() - started,
            data_wait_s=wait_total,
            compute_s=compute_total,
            checkpoint_s=checkpoint_total,
            last_loss=self.last_loss,
            dead_lettered=self.dataset.dead_lettered,
            finished=self.dataset.finished,
        )

    def _train_step(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        inputs, targets = batch[self.input_field], batch[self.target_field]
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(inputs)
        loss = self.loss_fn(outputs, targets)
        torch.autograd.backward(loss)
        self.optimizer.step()
        return outputs.detach(), targets, float(loss.detach())

    def _observe(
        self, n: int, loss: float, wait_s: float, compute_s: float, window: _Window, now: float
    ) -> None:
        m = self.metrics
        if m is None:
            return
        m.samples.inc(n)
        m.steps.inc()
        m.loss.set(loss)
        m.data_wait.inc(wait_s)
        m.compute.inc(compute_s)
        if now - window.since >= self.lag_every_s:
            m.samples_per_second.set(window.samples / max(now - window.since, 1e-9))
            m.data_stall_ratio.set(window.stall_share)
            m.consumer_lag.set(self.dataset.lag())
            dead = self.dataset.dead_lettered
            if dead > self._dead_seen:
                m.dead_lettered.inc(dead - self._dead_seen)
                self._dead_seen = dead
            window.reset(now)

    # -- checkpoints ----------------------------------------------------------------------------

    def _timed_checkpoint(self) -> float:
        started = time.monotonic()
        self.checkpoint()
        took = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.checkpoint_duration.observe(took)
        return took

    def _phase(self, phase: str) -> None:
        if self.on_checkpoint_phase is not None:
            self.on_checkpoint_phase(phase, self.step)

    def checkpoint(self) -> Checkpoint | None:
        """Checkpoint now, following the protocol in the module docstring; return the checkpoint.

        In a group every rank calls it together; rank 0 writes (and gets the checkpoint), the
        others get None.
        """
        if self.distributed is not None:
            from infeed.training.distributed_fit import checkpoint_group

            return checkpoint_group(self)
        self._phase("begin")
        state = self.dataset.state_dict()
        dataset_json, dataset_arrays = encode_state(state)
        files = self._common_files(world_size=None)
        files["dataset.json"] = dataset_json
        files["dataset.safetensors"] = dataset_arrays
        if self.audit_field is not None:
            values = np.concatenate(self._audit) if self._audit else np.empty(0, np.int64)
            self._audit = [values]
            files["audit.safetensors"] = np_save({"values": values})
        found = self.store.write(self.step, files, on_phase=self._phase)
        self._checkpointed_step = self.step
        self.dataset.commit(state)
        self._phase("committed")
        self._publish(found)
        self._progress(world_size=1, ranks=[_rank_summary(0, state)])
        self.store.prune()
        self._phase("end")
        return found

    def _common_files(self, *, world_size: int | None) -> dict[str, FileSource]:
        """Model, optimizer, counters and RNG: the files every checkpoint has."""
        optim_tensors, optim_json = optimizer_to_files(self.optimizer)
        trainer_meta: dict[str, Any] = {
            "format": TRAINER_FORMAT,
            "step": self.step,
            "samples": self.samples,
            "last_loss": None if self.last_loss != self.last_loss else self.last_loss,
            "model_name": self.model_name,
            "model_factory": self.model_factory,
            "model_kwargs": self.model_kwargs,
            "created_at": time.time(),  # wall clock, for people reading the file
        }
        if world_size is not None:
            trainer_meta["world_size"] = world_size
        return {
            "model.safetensors": lambda path: save_model(self.model, str(path)),
            "optimizer.safetensors": optim_tensors,
            "optimizer.json": optim_json,
            "trainer.json": json.dumps(trainer_meta, indent=1, sort_keys=True).encode(),
            "trainer.safetensors": st_save({"torch_rng": torch.get_rng_state()}),
        }

    def _progress(self, *, world_size: int, ranks: list[dict[str, Any]]) -> None:
        """Publish a training-progress event (JSON) on ``progress_topic``, if one is set."""
        if self.progress_topic is None:
            return
        event = {
            "model": self.model_name,
            "step": self.step,
            "samples": self.samples,
            "loss": None if self.last_loss != self.last_loss else self.last_loss,
            "world_size": world_size,
            "ranks": ranks,
            "time": time.time(),  # wall clock, for followers on other machines
        }
        with Producer(self.dataset.broker, self.progress_topic, codec=JsonCodec()) as producer:
            producer.send(event)

    def _publish(self, found: Checkpoint) -> None:
        if self.registry is None or self.model_name is None or self.model_factory is None:
            return
        version = self.registry.publish(
            self.model_name,
            self.model,
            version=found.step,
            factory=self.model_factory,
            kwargs=self.model_kwargs,
            step=self.step,
            samples=self.samples,
            metrics={} if self.last_loss != self.last_loss else {"loss": self.last_loss},
        )
        if self.events_topic is not None:
            announce(self.dataset.broker, version, topic=self.events_topic)
        self._phase("announced")


def _rank_summary(rank: int, state: Mapping[str, Any]) -> dict[str, Any]:
    """One rank's entry in a progress event: its partitions' next offsets and records held back."""
    meta = state["meta"]
    held = max((len(a) for a in state["arrays"].values()), default=0)
    return {
        "rank": rank,
        "positions": {str(p["partition"]): p["offset"] for p in meta["positions"]},
        "held": held,
        "records": meta["records"],
        "finished": meta["finished"],
    }


class _Window:
    """Counters since the last metrics refresh."""

    def __init__(self, now: float) -> None:
        self.reset(now)

    def reset(self, now: float) -> None:
        self.since = now
        self.samples = 0
        self.wait_s = 0.0
        self.compute_s = 0.0

    def add(self, n: int, wait_s: float, compute_s: float) -> None:
        self.samples += n
        self.wait_s += wait_s
        self.compute_s += compute_s

    @property
    def stall_share(self) -> float:
        busy = self.wait_s + self.compute_s
        return self.wait_s / busy if busy > 0 else 0.0
