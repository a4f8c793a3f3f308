"""Group checkpoints: one dataset state per rank, and their re-mapping when the world size changes.

A group checkpoint holds rank ``r``'s dataset state in ``dataset.json`` + ``dataset.safetensors``
for rank 0 and ``dataset.rank-RRRR.json`` + ``dataset.rank-RRRR.safetensors`` for the others, and
the world size in ``trainer.json`` (absent: 1). So a single-process checkpoint is the checkpoint
of a world of one, and either kind restores into any world size.

Restoring into a world of another size (:func:`remap_state`): partition ``p`` goes to rank
``p % world_size`` with the position it had in whichever old rank read it; the records an old
rank ``r`` had read but not trained (a partial batch, its shuffle buffer) go to new rank
``r % world_size``, which trains them first. Every record is before exactly one saved position
or in exactly one held set, so none is lost or trained twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from infeed.training.state import decode_positions, encode_positions
from infeed.types import Position

__all__ = ["dataset_files", "remap_state"]


def dataset_files(rank: int) -> tuple[str, str]:
    """The JSON and safetensors file names of rank ``rank``'s dataset state in a group checkpoint."""
    if rank == 0:
        return "dataset.json", "dataset.safetensors"
    return f"dataset.rank-{rank:04d}.json", f"dataset.rank-{rank:04d}.safetensors"


def _pairs(value: Any) -> dict[int, int]:
    return {int(p): int(o) for p, o in value} if value is not None else {}


def remap_state(
    states: Sequence[Mapping[str, Any]], rank: int, world_size: int, partitions: Sequence[int]
) -> dict[str, Any]:
    """Rank ``rank``'s dataset state in a world of ``world_size``, from the old ranks' ``states``.

    Args:
        states: every old rank's state (``QueueDataset.state_dict()`` form), in old rank order.
        rank: the new rank.
        world_size: the new world size.
        partitions: the partitions the new rank reads.

    Returns:
        A state to hand to ``QueueDataset.load_state_dict``: the old rank's own when nothing moved.

    Raises:
        ValueError: no states, a partition in two old states, or old ranks in different epochs
            where their partitions cannot be merged (only ranks that finished their last epoch may
            be one epoch ahead).
    """
    if not states:
        raise ValueError("a group checkpoint needs at least one rank's dataset state")
    mine = set(partitions)
    if len(states) == world_size:
        own = decode_positions(states[rank]["meta"]["positions"])
        if set(own) == mine or not own:
            return dict(states[rank])
    positions: dict[int, Position] = {}
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    seen: set[int] = set()
    for old_rank, state in enumerate(states):
        meta = state["meta"]
        for p, pos in decode_positions(meta["positions"]).items():
            if p in seen:
                raise ValueError(f"partition {p} appears in two ranks' states (rank {old_rank} and another)")
            seen.add(p)
            if p in mine:
                positions[p] = pos
        for p, o in _pairs(meta["epoch_start"]).items():
            if p in mine:
                start[p] = o
        for p, o in _pairs(meta["epoch_end"]).items():
            if p in mine:
                end[p] = o
    donors = [s for r, s in enumerate(states) if r % world_size == rank]
    holders = [s for s in states if set(decode_positions(s["meta"]["positions"])) & mine] + donors
    epochs = {int(s["meta"]["epoch"]) for s in holders}
    epoch = min(epochs, default=0)
    for s in holders:
        meta = s["meta"]
        if int(meta["epoch"]) != epoch and not (
            meta["finished"] and meta["epochs"] is not None and int(meta["epochs"]) == epoch + 1
        ):
            raise ValueError(
                f"cannot re-map partitions of ranks in epochs {sorted(epochs)} into rank {rank}: "
                "restore with the world size of the checkpoint until the epoch ends"
            )
    base = dict(states[rank % len(states)]["meta"])
    fields = list(base["fields"])
    arrays: dict[str, Any] = {}
    for name in fields:
        template = next((s["arrays"][name] for s in states if name in s["arrays"]), None)
        parts = [s["arrays"][name] for s in donors if name in s["arrays"]]
        if parts:
            arrays[name] = np.concatenate(parts)
        elif template is not None:
            arrays[name] = template[:0]  # no records held for this rank
    finished = all(bool(s["meta"]["finished"]) for s in holders) if holders else bool(base["finished"])
    base.update(
        positions=encode_positions(positions),
        epoch=epoch if not finished else max(epochs, default=epoch),
        epoch_start=sorted(start.items()) if start else None,
        epoch_end=sorted(end.items()) if end else None,
        finished=finished,
        records=sum(int(s["meta"]["records"]) for s in donors),
        batches=sum(int(s["meta"]["batches"]) for s in donors),
        dead_lettered=sum(int(s["meta"]["dead_lettered"]) for s in donors),
    )
    return {"meta": base, "arrays": arrays}
