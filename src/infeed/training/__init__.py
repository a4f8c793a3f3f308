"""Streaming training: a torch dataset over a topic, exactly-once checkpoints, model versions.

``QueueDataset`` (a torch IterableDataset over a topic), the ``Trainer`` with exactly-once
checkpoints (``CheckpointStore``), the ``ModelRegistry`` that carries versions to inference, and
``TrainingMetrics`` (Prometheus), and ``DistContext`` / ``assign_partitions`` for groups of ranks
under ``torchrun``. See docs/training.md.

The names are imported on first use, so that the dataset's feed process, which imports modules of
this package, starts without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infeed._lazy import lazy_attributes

if TYPE_CHECKING:
    from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry, ModelVersion, announce
    from infeed.training.checkpoint import Checkpoint, CheckpointStore
    from infeed.training.dataset import QueueDataset
    from infeed.training.distributed import DistContext, assign_partitions
    from infeed.training.metrics import TrainingMetrics
    from infeed.training.trainer import StepInfo, Trainer, TrainResult

__all__ = [
    "DEFAULT_EVENTS_TOPIC",
    "Checkpoint",
    "CheckpointStore",
    "DistContext",
    "ModelRegistry",
    "ModelVersion",
    "QueueDataset",
    "StepInfo",
    "TrainResult",
    "Trainer",
    "TrainingMetrics",
    "announce",
    "assign_partitions",
]

_HOMES = {
    "DEFAULT_EVENTS_TOPIC": "infeed.inference.registry",
    "ModelRegistry": "infeed.inference.registry",
    "ModelVersion": "infeed.inference.registry",
    "announce": "infeed.inference.registry",
    "Checkpoint": "infeed.training.checkpoint",
    "CheckpointStore": "infeed.training.checkpoint",
    "QueueDataset": "infeed.training.dataset",
    "DistContext": "infeed.training.distributed",
    "assign_partitions": "infeed.training.distributed",
    "TrainingMetrics": "infeed.training.metrics",
    "StepInfo": "infeed.training.trainer",
    "Trainer": "infeed.training.trainer",
    "TrainResult": "infeed.training.trainer",
}


__getattr__ = lazy_attributes(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted(__all__)
