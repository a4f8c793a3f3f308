"""Ranks of a ``torchrun`` job: detection, the process group, and the few collectives training needs.

``torchrun --nproc-per-node N -m infeed train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment;
:meth:`DistContext.from_env` sees them and joins the process group (gloo on CPU, NCCL when CUDA is
available). A process started without them gets None and trains alone, exactly as before.

Collectives move plain numbers and bytes (``all_reduce`` of a float64 tensor, ``all_gather`` of
uint8 tensors): nothing is pickled, unlike ``torch.distributed``'s ``*_object`` helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from infeed.types import Capability

if TYPE_CHECKING:
    from infeed.training.dataset import QueueDataset

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_S",
    "DistContext",
    "assign_partitions",
    "check_group_dataset",
    "launched_by_torchrun",
]

#: Longest a collective waits for the other ranks before it fails (a rank that vanished).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)."""
    return all(os.environ.get(name) for name in _ENV)


def assign_partitions(n_partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads: partition ``p`` goes to rank ``p % world_size``.

    Raises:
        ValueError: a negative count, or a rank outside the world.
    """
    if n_partitions < 0:
        raise ValueError(f"n_partitions must be >= 0, got {n_partitions}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return [p for p in range(n_partitions) if p % world_size == rank]


def check_group_dataset(dataset: QueueDataset) -> None:
    """Check that ``dataset`` can be one rank's share of a group.

    Ranks split a topic by partitions (``assign_partitions``), and a group checkpoint re-maps
    them by seeking; competing consumers on one queue cannot give per-rank positions to resume
    from exactly once.

    Raises:
        ValueError: the broker has no partitions or cannot seek, or the dataset reads all
            partitions.
    """
    broker = dataset.broker
    lacking = [c.name for c in (Capability.PARTITIONS, Capability.SEEK) if not broker.supports(c)]
    if lacking:
        raise ValueError(
            f"training in a group needs a broker with partitions and seek; {type(broker).__name__} "
            f"lacks {', '.join(lacking)}: train with one process on this broker"
        )
    if dataset.partitions is None:
        raise ValueError(
            "in a group each rank reads its own partitions: build the dataset with "
            "partitions=assign_partitions(n_partitions, rank, world_size)"
        )


@dataclass(frozen=True, slots=True)
class DistContext:
    """This process's place in a joined process group.

    Attributes:
        rank: this rank (0 writes checkpoints and events).
        world_size: ranks in the group.
        local_rank: rank on this node (picks the GPU).
        backend: ``gloo`` or ``nccl``.
        device: where the model and the collectives' tensors live.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @classmethod
    def from_env(
        cls, *, backend: str | None = None, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    ) -> DistContext | None:
        """Join the process group ``torchrun`` set up; None when not started by it.

        Args:
            backend: ``gloo`` or ``nccl`` (default: NCCL when CUDA is available, else gloo).
            timeout_s: how long a collective waits for the other ranks.

        Raises:
            ValueError: malformed ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` or an unknown backend.
        """
        if not launched_by_torchrun():
            return None
        try:
            rank, world, local = (int(os.environ[name]) for name in _ENV)
        except ValueError as exc:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
        if world <= 0 or not 0 <= rank < world or local < 0:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} do not make a rank")
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {chosen!r}")
        if chosen == "nccl":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            timeout = timedelta(seconds=timeout_s)
            store, _, _ = next(rendezvous("env://", timeout=timeout))
            # torchrun may keep one store across restarts of the group: keys a killed rank wrote
            # (its gloo address) would be read by the next round's ranks, so each round gets its own.
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = PrefixStore(f"infeed/round-{restart}", store)
            dist.init_process_group(chosen, store=store, rank=rank, world_size=world, timeout=timeout)
        return cls(rank=rank, world_size=world, local_rank=local, backend=chosen, device=device)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (every rank gets it)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.cpu()]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (every rank gets them)."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        out = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [t[: int(s)].cpu().numpy().tobytes() for t, s in zip(out, sizes, strict=True)]

    def barrier(self) -> None:
        """Wait until every rank is here (an all-reduce, so it works alike on gloo and NCCL)."""
        self.sum([0.0])

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
