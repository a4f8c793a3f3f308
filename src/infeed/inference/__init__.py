"""Inference over the queue: durable, batched, deadline-aware; model versions with hot reload.

Public API (see docs/inference.md)::

    Client(broker, model, *, config=ClientConfig())        sync; thread-safe
        .submit(inputs, *, timeout_s=None, priority=0, model_version=None) -> Future[Reply]
        .predict(inputs, *, timeout_s=None, priority=0, model_version=None) -> dict[str, ndarray]
        .close()
    AsyncClient(broker, model, *, config=ClientConfig())   the same, awaitable
    Worker(broker, registry, model, *, config=WorkerConfig(), middleware=())
        .run(stop=None) / .run_once(timeout_s) -> int / .close()
    ModelRegistry(root), ModelVersion, announce(broker, version, *, topic=DEFAULT_EVENTS_TOPIC)
    InferenceMetrics(registry=None)                        Prometheus, a worker middleware
    Scorer(broker, registry, model, *, in_topic, out_topic, config=ScoreConfig())
        .run(stop=None) / .run_once(timeout_s) -> int / .frontier / .close()
                                                           topic to topic, exactly once

Errors (``infeed.errors``): ``QueueFull`` (refused at once), ``InferenceError`` (an error reply,
``.code``), ``DeadlineExceededError`` (no result in time; also a ``TimeoutError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infeed._lazy import lazy_attributes

if TYPE_CHECKING:
    from infeed.inference.aio import AsyncClient
    from infeed.inference.batcher import Batch, BatchConfig, Batcher, Pending, run_model
    from infeed.inference.client import Client, ClientConfig
    from infeed.inference.middleware import InferenceMetrics, Middleware
    from infeed.inference.protocol import (
        ErrorCode,
        Reply,
        ReplyError,
        Request,
        decode_reply,
        decode_request,
        encode_reply,
        encode_request,
        request_topic,
        worker_group,
    )
    from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry, ModelVersion, announce
    from infeed.inference.scorer import ScoreConfig, Scorer
    from infeed.inference.worker import Worker, WorkerConfig

# Names resolve on first use, so a client (protocol, client, aio) never imports torch: only the
# worker side (batcher, worker, models, registry) needs it.
_WHERE = {
    "AsyncClient": "aio",
    "Batch": "batcher",
    "BatchConfig": "batcher",
    "Batcher": "batcher",
    "Pending": "batcher",
    "run_model": "batcher",
    "Client": "client",
    "ClientConfig": "client",
    "InferenceMetrics": "middleware",
    "Middleware": "middleware",
    "ErrorCode": "protocol",
    "Reply": "protocol",
    "ReplyError": "protocol",
    "Request": "protocol",
    "decode_reply": "protocol",
    "decode_request": "protocol",
    "encode_reply": "protocol",
    "encode_request": "protocol",
    "request_topic": "protocol",
    "worker_group": "protocol",
    "DEFAULT_EVENTS_TOPIC": "registry",
    "ModelRegistry": "registry",
    "ModelVersion": "registry",
    "announce": "registry",
    "ScoreConfig": "scorer",
    "Scorer": "scorer",
    "Worker": "worker",
    "WorkerConfig": "worker",
}


__getattr__ = lazy_attributes(__name__, {name: f"{__name__}.{home}" for name, home in _WHERE.items()})


__all__ = [
    "DEFAULT_EVENTS_TOPIC",
    "AsyncClient",
    "Batch",
    "BatchConfig",
    "Batcher",
    "Client",
    "ClientConfig",
    "ErrorCode",
    "InferenceMetrics",
    "Middleware",
    "ModelRegistry",
    "ModelVersion",
    "Pending",
    "Reply",
    "ReplyError",
    "Request",
    "ScoreConfig",
    "Scorer",
    "Worker",
    "WorkerConfig",
    "announce",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "request_topic",
    "run_model",
    "worker_group",
]
