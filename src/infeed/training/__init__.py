"""Streaming training: a torch dataset over a topic, exactly-once checkpoints, model versions.

``QueueDataset`` (a torch IterableDataset over a topic), the ``Trainer`` with exactly-once
checkpoints (``CheckpointStore``), the ``ModelRegistry`` that carries versions to inference, and
``TrainingMetrics`` (Prometheus), and ``DistContext`` / ``assign_partitions`` for groups of ranks
under ``torchrun``. See docs/training.md.
"""

from __future__ import annotations

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
