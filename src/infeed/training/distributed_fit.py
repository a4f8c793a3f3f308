"""The ``Trainer``'s loop, checkpoint and restore for a group of ranks (``torchrun``).

**The lockstep rule.** Every step starts with one all-reduce of ``[records in my batch, my data
ended, stop asked, checkpoint due]``. Each rank first waits at most ``starve_wait_s`` for its next
batch (records read meanwhile stay held in its dataset state and go into a later batch).

* If any rank has a batch, every rank takes the step: ranks with a batch run it, a rank without
  one runs the model on an empty batch and contributes zero gradients, and each rank's loss is
  weighted by its share of the step's records, so DDP's all-reduced gradient is the gradient of
  the mean loss over all the step's records. No batch waits unused, so no record is in flight
  across a step.
* A rank whose data ended (its last epoch, or nothing came for ``idle_timeout_s``) stops reading
  for the rest of the run but keeps taking part in every step.
* When no rank has a batch and every rank's data ended, all stop together; so does every rank
  when any rank is asked to stop, after the step in hand.

Checkpoints are taken by all ranks together (same step counter, rank 0's clock): every rank's
dataset state (and audit) is gathered to rank 0, which writes one checkpoint durably; after a
barrier each rank commits its own partitions' positions; after another, rank 0 announces the
version and publishes a progress event.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from torch.nn.parallel import DistributedDataParallel

from infeed.training.checkpoint import Checkpoint
from infeed.training.distributed import DistContext, assign_partitions
from infeed.training.distributed_state import dataset_files, remap_state
from infeed.training.state import decode_state, encode_state

if TYPE_CHECKING:
    from infeed.training.trainer import Trainer, TrainResult

__all__ = ["checkpoint_group", "fit_group", "restore_group"]

_Array = np.ndarray[Any, Any]


def _ctx(trainer: Trainer) -> DistContext:
    ctx = trainer.distributed
    if ctx is None:
        raise ValueError("this trainer is not part of a group (distributed=None)")
    return ctx


def _partitions(trainer: Trainer) -> list[int]:
    if trainer.dataset.partitions is not None:
        return list(trainer.dataset.partitions)
    ctx = _ctx(trainer)
    n = len(trainer.dataset.broker.describe_topic(trainer.dataset.topic).partitions)
    return assign_partitions(n, ctx.rank, ctx.world_size)


def restore_group(trainer: Trainer) -> int | None:
    """Load the newest group checkpoint on every rank, re-mapping partitions to this world size."""
    ctx = _ctx(trainer)
    if ctx.is_main:
        trainer.store.recover()
    ctx.barrier()
    found = trainer.store.latest()
    if found is None:
        return None
    meta = trainer._load_common(found)
    old_world = int(meta.get("world_size", 1))
    states = [decode_state(*(found.read_bytes(name) for name in dataset_files(r))) for r in range(old_world)]
    trainer.dataset.load_state_dict(remap_state(states, ctx.rank, ctx.world_size, _partitions(trainer)))
    if ctx.is_main and "audit.safetensors" in found:
        saved = np_load(found.read_bytes("audit.safetensors"))
        values = saved["values"]
        steps = saved.get("steps", np.full(len(values), -1, np.int64))
        trainer._group_audit = (values, steps)
    trainer._restored = trainer.step
    trainer._dead_seen = trainer.dataset.dead_lettered
    ctx.barrier()  # every rank read the checkpoint before rank 0 may write (and prune) the next
    if ctx.is_main:
        trainer._publish(found)
    return trainer.step


def _empty_batch(trainer: Trainer, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.empty((0, *spec.shape), spec.numpy_dtype)).to(device)
        for name, spec in trainer.dataset.schema.fields.items()
        if name in (trainer.input_field, trainer.target_field)
    }


def fit_group(trainer: Trainer) -> TrainResult:
    """Restore, then train in lockstep with the other ranks (module docstring) until all stop."""
    from infeed.training.trainer import StepInfo, TrainResult, _Window

    ctx = _ctx(trainer)
    started = time.monotonic()
    trainer.restore()
    trainer.model.to(ctx.device)
    ddp = DistributedDataParallel(
        trainer.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
    )
    trainer.model.train()
    steps_run = checkpoints = 0
    wait_total = compute_total = checkpoint_total = 0.0
    last_checkpoint = time.monotonic()
    window = _Window(last_checkpoint)
    ended = not _partitions(trainer)
    every_s, every_steps = trainer.checkpoint_every_s, trainer.checkpoint_every_steps
    while not _global_limit(trainer):
        t0 = time.monotonic()
        batch = None
        if not ended:
            batch = trainer.dataset.poll(trainer.starve_wait_s)
            ended = trainer.dataset.ended
        n = len(batch[trainer.target_field]) if batch is not None else 0
        due = ctx.is_main and every_s is not None and t0 - last_checkpoint >= every_s
        total, n_ended, stops, due_flag = ctx.sum(
            [n, float(ended), float(trainer._stop.is_set()), float(due)]
        )
        t1 = time.monotonic()
        if total > 0:
            local = batch if batch is not None else _empty_batch(trainer, ctx.device)
            outputs, targets, loss = _step(trainer, ddp, local, n, int(total), ctx)
            t2 = time.monotonic()
            trainer.step += 1
            trainer.samples += int(total)
            trainer.last_loss = loss
            steps_run += 1
            wait_total += t1 - t0
            compute_total += t2 - t1
            window.add(n, t1 - t0, t2 - t1)
            trainer._observe(n, loss, t1 - t0, t2 - t1, window, t2)  # this rank's records
            if trainer.audit_field is not None and batch is not None:
                trainer._audit.append(batch[trainer.audit_field].numpy())
                trainer._audit_steps.append(np.full(n, trainer.step, np.int64))
            if trainer.on_step is not None:
                trainer.on_step(
                    StepInfo(
                        trainer.step, trainer.samples, int(total), loss, t1 - t0, t2 - t1, outputs, targets
                    )
                )
        if stops > 0 or (total == 0 and n_ended == ctx.world_size):
            break
        if trainer.step != trainer._checkpointed_step and (
            due_flag > 0 or (every_steps is not None and total > 0 and trainer.step % every_steps == 0)
        ):
            checkpoint_total += _timed(trainer)
            checkpoints += 1
            last_checkpoint = time.monotonic()
    if trainer.step != trainer._checkpointed_step:
        checkpoint_total += _timed(trainer)
        checkpoints += 1
    return TrainResult(
        steps=trainer.step,
        samples=trainer.samples,
        resumed_from=trainer._restored,
        steps_run=steps_run,
        checkpoints=checkpoints,
        seconds=time.monotonic() - started,
        data_wait_s=wait_total,
        compute_s=compute_total,
        checkpoint_s=checkpoint_total,
        last_loss=trainer.last_loss,
        dead_lettered=trainer.dataset.dead_lettered,
        finished=trainer.dataset.finished,
    )


def _global_limit(trainer: Trainer) -> bool:
    # Counters every rank shares; a stop request is agreed through the all-reduce instead.
    return (trainer.max_samples is not None and trainer.samples >= trainer.max_samples) or (
        trainer.max_steps is not None and trainer.step >= trainer.max_steps
    )


def _step(
    trainer: Trainer,
    ddp: DistributedDataParallel,
    batch: dict[str, torch.Tensor],
    n: int,
    total: int,
    ctx: DistContext,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    inputs = batch[trainer.input_field].to(ctx.device)
    targets = batch[trainer.target_field].to(ctx.device)
    trainer.optimizer.zero_grad(set_to_none=True)
    outputs = ddp(inputs)
    if n > 0:
        mean = trainer.loss_fn(outputs, targets)
        # DDP averages over ranks: scale so the result is the mean over all the step's records.
        loss = mean * (n * ctx.world_size / total)
        local_sum = float(mean.detach()) * n
    else:
        loss = outputs.sum() * 0.0
        local_sum = 0.0
    torch.autograd.backward(loss)
    trainer.optimizer.step()
    (loss_sum,) = ctx.sum([local_sum])
    return outputs.detach(), targets, loss_sum / total


def _timed(trainer: Trainer) -> float:
    started = time.monotonic()
    checkpoint_group(trainer)
    took = time.monotonic() - started
    if trainer.metrics is not None:
        trainer.metrics.checkpoint_duration.observe(took)
    return took


def _pack(state: dict[str, Any], audit: tuple[_Array, _Array]) -> bytes:
    meta, arrays = encode_state(state)
    return np_save(
        {
            "meta": np.frombuffer(meta, np.uint8),
            "arrays": np.frombuffer(arrays, np.uint8),
            "audit_values": audit[0],
            "audit_steps": audit[1],
        }
    )


def checkpoint_group(trainer: Trainer) -> Checkpoint | None:
    """Checkpoint every rank's state in one checkpoint (all ranks call it; rank 0 writes it)."""
    from infeed.training.trainer import _rank_summary

    ctx = _ctx(trainer)
    trainer._phase("begin")
    state = trainer.dataset.state_dict()
    values = np.concatenate(trainer._audit) if trainer._audit else np.empty(0, np.int64)
    steps = np.concatenate(trainer._audit_steps) if trainer._audit_steps else np.empty(0, np.int64)
    packed = ctx.gather_bytes(_pack(state, (values, steps)))
    found: Checkpoint | None = None
    summaries: list[dict[str, Any]] = []
    if ctx.is_main:
        files = trainer._common_files(world_size=ctx.world_size)
        all_values, all_steps = [trainer._group_audit[0]], [trainer._group_audit[1]]
        for rank, data in enumerate(packed):
            parts = np_load(data)
            meta_name, arrays_name = dataset_files(rank)
            files[meta_name] = parts["meta"].tobytes()
            files[arrays_name] = parts["arrays"].tobytes()
            all_values.append(parts["audit_values"])
            all_steps.append(parts["audit_steps"])
            summaries.append(
                _rank_summary(rank, decode_state(parts["meta"].tobytes(), parts["arrays"].tobytes()))
            )
        if trainer.audit_field is not None:
            trainer._group_audit = (np.concatenate(all_values), np.concatenate(all_steps))
            files["audit.safetensors"] = np_save(
                {"values": trainer._group_audit[0], "steps": trainer._group_audit[1]}
            )
        found = trainer.store.write(trainer.step, files, on_phase=trainer._phase)
    ctx.barrier()  # the checkpoint is durable: only now may any rank commit
    trainer._audit, trainer._audit_steps = [], []
    trainer._checkpointed_step = trainer.step
    trainer.dataset.commit(state)
    trainer._phase("committed")
    ctx.barrier()  # every rank committed: only now is the version announced
    if found is not None:
        trainer._publish(found)
        trainer._progress(world_size=ctx.world_size, ranks=summaries)
        trainer.store.prune()
    trainer._phase("end")
    return found
