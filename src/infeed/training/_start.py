"""Where a dataset's consumer starts: its subscription, the resume positions and the epoch plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from infeed.brokers import Broker
from infeed.brokers.base import Consumer
from infeed.codecs import CodecRegistry, Schema
from infeed.streams import StreamConsumer
from infeed.training._prefetch import EpochPlan, TapConsumer
from infeed.types import Capability, Position

__all__ = ["plan_from_json", "plan_to_json", "position_at_start", "subscribe_stream"]


def plan_to_json(plan: EpochPlan | None) -> dict[str, Any] | None:
    """The plan as a JSON-safe dict (None stays None)."""
    if plan is None:
        return None
    return {"start": sorted(plan.start.items()), "end": sorted(plan.end.items()), "remaining": plan.remaining}


def plan_from_json(data: Mapping[str, Any] | None) -> EpochPlan | None:
    """Read what :func:`plan_to_json` wrote."""
    if data is None:
        return None
    return EpochPlan(
        start={int(p): int(o) for p, o in data["start"]},
        end={int(p): int(o) for p, o in data["end"]},
        remaining=int(data["remaining"]),
    )


def subscribe_stream(
    broker: Broker,
    topic: str,
    *,
    group: str,
    schema: Schema,
    partitions: Sequence[int] | None,
    dead_letter_topic: str | None,
    codecs: CodecRegistry | None = None,
) -> StreamConsumer:
    """Join ``group`` on ``topic`` from the earliest message, behind the tap a ``Prefetcher`` needs.

    Args:
        broker: the broker to subscribe on.
        topic: the topic to read.
        group: the consumer group.
        schema: every record is validated and cast to it.
        partitions: read only these partitions (None: all).
        dead_letter_topic: where poison goes (None: ``TOPIC.dlq``).
        codecs: codecs the messages may use (None: the default ones).
    """
    consumer = broker.subscribe(
        topic, group=group, start="earliest", partitions=partitions, dead_letter_topic=dead_letter_topic
    )
    return StreamConsumer(TapConsumer(consumer), registry=codecs, schema=schema)


def position_at_start(
    broker: Broker,
    consumer: Consumer,
    topic: str,
    *,
    partitions: Sequence[int] | None,
    resume: Mapping[int, Position],
    plan: EpochPlan | None,
    epochs: int | None,
    epoch: int,
) -> tuple[dict[int, Position], EpochPlan | None]:
    """Seek ``consumer`` to where reading resumes; return those positions and the epoch plan.

    Without ``resume`` positions (no loaded state), reading resumes at the group's committed
    positions, else at the start of each partition. A broker without ``SEEK`` is left where the
    group stands (``resume`` and ``plan`` come back unchanged).

    Args:
        broker: the broker ``consumer`` reads from.
        consumer: the dataset's consumer, just subscribed.
        topic: the topic it reads.
        partitions: the partitions read (None: all).
        resume: per partition, the position of the next record to read (may be empty).
        plan: the epoch plan of a loaded state, if any.
        epochs: passes over the topic (None: an endless stream).
        epoch: epochs completed already.
    """
    if not broker.supports(Capability.SEEK):
        return dict(resume), plan
    info = broker.describe_topic(topic)
    parts = partitions if partitions is not None else range(len(info.partitions))
    extent = {p: info.partitions[p] for p in parts}
    positions = dict(resume)
    if not positions:
        committed = consumer.committed() if broker.supports(Capability.OFFSET_COMMIT) else {}
        positions = {p: committed.get(p, Position(topic, p, extent[p].low)) for p in parts}
    for p in parts:
        positions.setdefault(p, Position(topic, p, extent[p].low))
    consumer.seek([Position(topic, p, pos.offset) for p, pos in positions.items()])
    if epochs is not None and plan is None:
        plan = EpochPlan(
            start={p: e.low for p, e in extent.items()},
            end={p: e.high for p, e in extent.items()},
            remaining=epochs - epoch,
        )
    return positions, plan
