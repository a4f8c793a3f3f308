"""Value types shared by every layer: positions, deliveries, capabilities, topic descriptions."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "Capability",
    "Delivery",
    "GroupInfo",
    "PartitionInfo",
    "Position",
    "TopicInfo",
    "trusted_delivery",
    "trusted_position",
]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in one partition of a topic.

    ``offset`` is an integer that grows with the partition's order on every log backend (Kafka
    offsets, JetStream sequences, Redis stream ids packed into one integer, ...). A position is a
    *resume point*: ``seek`` to it delivers the first message whose offset is ``>= offset``;
    ``commit`` of it records that every message before it is done. To commit a delivery, commit
    ``delivery.next_position``.

    ``record`` points inside a record batch (DESIGN.md): resume at record ``record`` of the message
    at ``offset``. Brokers ignore it; the training layer uses it.
    """

    topic: str
    partition: int
    offset: int
    record: int = 0

    def __post_init__(self) -> None:
        if not self.topic or ":" in self.topic:
            raise ValueError(f"Position.topic must be a non-empty string without ':', got {self.topic!r}")
        if self.partition < 0:
            raise ValueError(f"Position.partition must be >= 0, got {self.partition}")
        if self.offset < 0:
            raise ValueError(f"Position.offset must be >= 0, got {self.offset}")
        if self.record < 0:
            raise ValueError(f"Position.record must be >= 0, got {self.record}")

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-safe dict (for checkpoints and the CLI)."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "record": self.record,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Position:
        """Build a Position from :meth:`to_json` output.

        Raises:
            ValueError: if a field is missing or of the wrong type.
        """
        try:
            topic, partition, offset = data["topic"], data["partition"], data["offset"]
            record = data.get("record", 0)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a position: {data!r}") from exc
        for name, value in (("partition", partition), ("offset", offset), ("record", record)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"position {name} must be an integer, got {value!r}")
        if not isinstance(topic, str):
            raise ValueError(f"position topic must be a string, got {topic!r}")
        return cls(topic, partition, offset, record)

    def __str__(self) -> str:
        text = f"{self.topic}:{self.partition}:{self.offset}"
        return f"{text}:{self.record}" if self.record else text

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse ``topic:partition:offset[:record]`` (the form ``str()`` writes).

        Raises:
            ValueError: naming the text when it is not of that form.
        """
        parts = text.rsplit(":", 3)
        try:
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
                return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
            parts = text.rsplit(":", 2)
            if len(parts) == 3:
                return cls(parts[0], int(parts[1]), int(parts[2]))
        except ValueError as exc:
            raise ValueError(f"bad position {text!r}: {exc}") from exc
        raise ValueError(f"bad position {text!r}: expected TOPIC:PARTITION:OFFSET[:RECORD]")


class Capability(enum.Enum):
    """What a backend can do. The contract suite skips what a backend declares it lacks."""

    #: Messages stay after they are consumed and can be read again (a log, not a queue).
    REPLAY = "replay"
    #: ``Consumer.seek`` moves a group to a position.
    SEEK = "seek"
    #: Each delivery is acked on its own (not only cumulatively).
    PER_MESSAGE_ACK = "per_message_ack"
    #: ``Consumer.commit`` stores a durable resume position per group and partition.
    OFFSET_COMMIT = "offset_commit"
    #: Messages carry a priority that reorders delivery.
    PRIORITY = "priority"
    #: Topics have several partitions with FIFO order inside each.
    PARTITIONS = "partitions"
    #: ``nack(requeue=False)`` moves the message to a dead-letter topic with the reason.
    DEAD_LETTER = "dead_letter"
    #: Unacked messages of a consumer that died are delivered again to another member.
    REDELIVERY = "redelivery"
    #: ``delivery_count`` also counts a redelivery caused by a consumer crash (SIGKILL of its
    #: process), not only nacks and expired leases: the count survives the crashed process.
    CRASH_DELIVERY_COUNT = "crash_delivery_count"
    #: Several OS processes can share one broker (false only for ``memory://``).
    MULTI_PROCESS = "multi_process"
    #: Old messages can be dropped by policy (committed by every group, age, size).
    RETENTION = "retention"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a consumer.

    Attributes:
        payload: the message bytes, as published.
        key: the partitioning key, if any.
        headers: string headers (the codec name travels here).
        position: where the message stands in its partition.
        delivery_count: 1 on first delivery, 2 after one redelivery, ...
        timestamp: publish time, seconds since the epoch (wall clock, from the broker).
        receipt: backend-private handle used by ``ack`` / ``nack``.
    """

    payload: bytes
    key: bytes | None
    headers: Mapping[str, str]
    position: Position
    delivery_count: int = 1
    timestamp: float = 0.0
    receipt: Any = field(default=None, compare=False, repr=False)

    @property
    def topic(self) -> str:
        """The topic the message came from."""
        return self.position.topic

    @property
    def partition(self) -> int:
        """The partition the message came from."""
        return self.position.partition

    @property
    def next_position(self) -> Position:
        """The resume point just after this message: what to ``commit`` once it is done."""
        p = self.position
        return Position(p.topic, p.partition, p.offset + 1)


_new = object.__new__
_POSITION_SLOTS = tuple(
    getattr(Position, name).__set__ for name in ("topic", "partition", "offset", "record")
)
_DELIVERY_SLOTS = tuple(
    getattr(Delivery, name).__set__
    for name in ("payload", "key", "headers", "position", "delivery_count", "timestamp", "receipt")
)


def trusted_position(topic: str, partition: int, offset: int) -> Position:
    """``Position(topic, partition, offset)`` without its checks, for a backend's receive loop.

    Only for values the backend already knows are valid (its own topic, partitions and offsets):
    a frozen dataclass's ``__init__`` and checks cost ~1 µs a message, which adds up at one record
    per message.
    """
    position: Position = _new(Position)
    set_topic, set_partition, set_offset, set_record = _POSITION_SLOTS
    set_topic(position, topic)
    set_partition(position, partition)
    set_offset(position, offset)
    set_record(position, 0)
    return position


def trusted_delivery(
    payload: bytes,
    key: bytes | None,
    headers: Mapping[str, str],
    position: Position,
    delivery_count: int,
    timestamp: float,
    receipt: Any,
) -> Delivery:
    """``Delivery(...)`` with every field given, built about twice as fast (a receive loop's)."""
    delivery: Delivery = _new(Delivery)
    s_payload, s_key, s_headers, s_position, s_count, s_timestamp, s_receipt = _DELIVERY_SLOTS
    s_payload(delivery, payload)
    s_key(delivery, key)
    s_headers(delivery, headers)
    s_position(delivery, position)
    s_count(delivery, delivery_count)
    s_timestamp(delivery, timestamp)
    s_receipt(delivery, receipt)
    return delivery


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A consumer group's state on one topic.

    Attributes:
        name: the group name.
        committed: committed resume offset per partition (absent: never committed).
        lag: messages after the committed position per partition.
        pending: delivered but not yet acked, over all partitions (-1 when unknown).
    """

    name: str
    committed: Mapping[int, int]
    lag: Mapping[int, int]
    pending: int = -1

    @property
    def total_lag(self) -> int:
        """Lag summed over partitions."""
        return sum(self.lag.values())


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition's extent.

    Attributes:
        partition: the partition number.
        low: the smallest offset still held (the next offset when empty).
        high: one past the largest offset ever written (the next offset to be written).
        depth: messages currently held (not always ``high - low``: offsets may be sparse).
    """

    partition: int
    low: int
    high: int
    depth: int


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A topic's partitions and groups."""

    name: str
    partitions: tuple[PartitionInfo, ...]
    groups: tuple[GroupInfo, ...] = ()
    config: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def depth(self) -> int:
        """Messages held over all partitions."""
        return sum(p.depth for p in self.partitions)
