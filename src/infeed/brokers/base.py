"""The bytes-level broker contract: ``Broker`` and ``Consumer``.

Brokers move bytes; they never see tensors or records (codecs do that one layer up). The contract
is synchronous: see docs/architecture.md ("One I/O flavour") for why, and ``_aio.py`` for the thin
adapter that asyncio-only client libraries run behind.

Semantics every backend keeps (the contract suite in tests/contract checks them):

* FIFO per partition; the same key always lands in the same partition.
* Within a group each message goes to one member at a time; every group sees every message.
* ``ack`` says "this one message is handled"; ``commit`` stores a resume position for the group.
  They are never conflated: acking does not commit, committing does not ack.
* A delivery left unacked for ``ack_timeout_s`` (or whose consumer died) is delivered again, to
  any member (where ``Capability.REDELIVERY`` is declared), with ``delivery_count`` one higher
  (after a consumer crash, only where ``Capability.CRASH_DELIVERY_COUNT`` is declared too).
* ``nack(requeue=True)`` makes the message available again at once; ``nack(requeue=False)``
  moves it to the dead-letter topic with the reason in its headers.
* A group sees the messages published after it first subscribed; only backends that declare
  ``Capability.REPLAY`` (logs) also hold earlier ones for a new group (``start="earliest"``).
* A payload over ``max_payload_bytes`` raises ``PayloadTooLargeError`` and nothing of the call
  is written.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Literal, NamedTuple, Self

from infeed.errors import LeaseLostError, PayloadTooLargeError, UnsupportedOperationError
from infeed.types import Capability, Delivery, Position, TopicInfo

__all__ = [
    "DEFAULT_ACK_TIMEOUT_S",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DLQ_HEADER_COUNT",
    "DLQ_HEADER_OFFSET",
    "DLQ_HEADER_PARTITION",
    "DLQ_HEADER_REASON",
    "DLQ_HEADER_TOPIC",
    "Broker",
    "BrokerConfig",
    "Consumer",
    "Message",
    "StartFrom",
    "as_deliveries",
    "as_positions",
    "check_headers",
    "check_payload",
    "check_topic_name",
    "check_trim_limits",
    "dead_letter_copy",
    "dead_letter_headers",
    "dead_letter_topic",
    "normalize_key",
    "partition_for_key",
]

#: How long a delivery may stay unacked before it is delivered again to another member.
DEFAULT_ACK_TIMEOUT_S = 30.0
#: Largest payload accepted by default (bytes); backends may lower it to their engine's limit.
DEFAULT_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

#: Headers a dead-lettered message carries, beside its original headers.
DLQ_HEADER_REASON = "x-infeed-dlq-reason"
DLQ_HEADER_TOPIC = "x-infeed-dlq-topic"
DLQ_HEADER_PARTITION = "x-infeed-dlq-partition"
DLQ_HEADER_OFFSET = "x-infeed-dlq-offset"
DLQ_HEADER_COUNT = "x-infeed-dlq-delivery-count"

#: Where a group with no state of its own starts reading.
StartFrom = Literal["earliest", "latest"]


def dead_letter_topic(topic: str) -> str:
    """Return the default dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


default_dead_letter_topic = dead_letter_topic  # for scopes where a parameter shadows the name


class Message(NamedTuple):
    """One message to publish with ``publish_many``."""

    payload: bytes
    key: bytes | str | None = None
    headers: Mapping[str, str] | None = None
    #: Send to this partition instead of hashing the key.
    partition: int | None = None


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Options every backend takes from its URL query (``?ack_timeout_s=5``).

    Attributes:
        ack_timeout_s: seconds a delivery may stay unacked before it is redelivered.
        max_payload_bytes: largest payload accepted.
        default_partitions: partitions of a topic created implicitly by publish or subscribe.
    """

    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    default_partitions: int = 1

    def __post_init__(self) -> None:
        if not self.ack_timeout_s > 0:
            raise ValueError(f"ack_timeout_s must be > 0, got {self.ack_timeout_s}")
        if self.max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes must be > 0, got {self.max_payload_bytes}")
        if self.default_partitions <= 0:
            raise ValueError(f"default_partitions must be > 0, got {self.default_partitions}")


def normalize_key(key: bytes | str | None) -> bytes | None:
    """Return the key as bytes (str keys are UTF-8)."""
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    raise TypeError(f"key must be bytes, str or None, got {type(key).__name__}")


def check_payload(payload: object, limit: int) -> bytes:
    """Return ``payload`` as bytes if it is within ``limit``.

    Raises:
        TypeError: if it is not bytes-like.
        PayloadTooLargeError: if it is over ``limit``.
    """
    if isinstance(payload, bytearray | memoryview):
        payload = bytes(payload)
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limit:
        raise PayloadTooLargeError(
            f"payload of {len(payload)} bytes is over the broker's limit of {limit} bytes; "
            "split it, or raise max_payload_bytes where the engine allows"
        )
    return payload


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Return a copy of ``headers`` after checking every key and value is a str."""
    if not headers:
        return {}
    out: dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"headers must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return out


def as_deliveries(deliveries: Delivery | Iterable[Delivery]) -> list[Delivery]:
    """Accept one delivery or many."""
    if isinstance(deliveries, Delivery):
        return [deliveries]
    return list(deliveries)


def as_positions(positions: Position | Iterable[Position]) -> list[Position]:
    """Accept one position or many."""
    if isinstance(positions, Position):
        return [positions]
    return list(positions)


class Consumer(abc.ABC):
    """A member of a consumer group on one topic. Use it from one thread at a time."""

    def __init__(self, broker: Broker, topic: str, group: str, dead_letter_topic: str | None = None) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        #: Where ``nack(requeue=False)`` sends messages.
        self.dead_letter_topic = dead_letter_topic or default_dead_letter_topic(topic)

    @abc.abstractmethod
    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """Wait up to ``timeout_s`` for messages and return at most ``max_messages``.

        Returns an empty list only when nothing arrived before the deadline.

        Raises:
            BrokerError: if the broker fails; never turned into an empty list.
        """

    @abc.abstractmethod
    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        """Mark deliveries as handled: they are not delivered to this group again.

        Raises:
            LeaseLostError: if a delivery's lease had already passed to another member.
        """

    def receive_acked(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """``receive`` and ``ack`` in one step, for a reader that owns its resume positions.

        The deliveries come back acked: they hold no lease, so they cannot be acked or nacked
        again (dead-letter a copy with ``broker.publish_many`` instead). A backend may store
        these acks lazily (Kafka writes them at most a second apart, and at ``commit``, ``close``
        and a rebalance): after a crash, the last of them may be handed out again. A reader that
        keeps its own positions (``commit`` at a checkpoint, ``seek`` on resume) loses and
        repeats nothing.

        A delivery whose lease passed to another member before its ack (a reader stalled past
        ``ack_timeout_s`` between the two) is returned all the same: the other member may get it
        too, as with any late ``ack``.

        Raises:
            BrokerError: if the broker fails; never turned into an empty list.
        """
        out = self.receive(max_messages=max_messages, timeout_s=timeout_s)
        if out:
            try:
                self.ack(out)
            except LeaseLostError:
                pass  # see above: returned all the same
        return out

    @abc.abstractmethod
    def nack(
        self,
        deliveries: Delivery | Iterable[Delivery],
        *,
        requeue: bool = True,
        reason: str = "",
    ) -> None:
        """Give deliveries back: available again now, or dead-lettered with ``reason``."""

    def commit(self, positions: Position | Iterable[Position]) -> None:
        """Store resume positions for the group, one per partition.

        Raises:
            UnsupportedOperationError: where ``Capability.OFFSET_COMMIT`` is not declared.
        """
        raise UnsupportedOperationError(
            f"{type(self.broker).__name__} has no offset commits; ack each delivery instead"
        )

    def seek(self, positions: Position | Iterable[Position]) -> None:
        """Move the group so the next delivery of each partition is at ``offset`` or after.

        Raises:
            UnsupportedOperationError: where ``Capability.SEEK`` is not declared.
        """
        raise UnsupportedOperationError(f"{type(self.broker).__name__} cannot seek")

    def committed(self) -> dict[int, Position]:
        """Return the group's committed resume position per partition (none yet: absent).

        Raises:
            UnsupportedOperationError: where ``Capability.OFFSET_COMMIT`` is not declared.
        """
        raise UnsupportedOperationError(f"{type(self.broker).__name__} has no offset commits")

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group. Unacked deliveries become available to others. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Broker(abc.ABC):
    """A connection to one message engine. Safe to share between threads.

    Subclasses set ``scheme`` and ``capabilities`` and implement the abstract methods.
    """

    scheme: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        #: The URL it was opened from by :func:`infeed.brokers.connect` (None when built directly):
        #: what another process needs to open the same broker.
        self.url: str | None = None

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Self:
        """Connect from a URL whose query holds the backend's options.

        Raises:
            ConfigError: for a malformed URL or an unknown option.
        """

    @property
    def max_payload_bytes(self) -> int:
        """Largest payload this broker accepts."""
        return self.config.max_payload_bytes

    def supports(self, capability: Capability) -> bool:
        """Return whether the backend declares ``capability``."""
        return capability in self.capabilities

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        partition: int | None = None,
    ) -> None:
        """Publish one message; returns once the broker holds it durably.

        Raises:
            PayloadTooLargeError: over ``max_payload_bytes``; nothing written.
            BrokerError: the broker failed.
        """
        self.publish_many(topic, [Message(payload, key, headers, partition)])

    @abc.abstractmethod
    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Publish messages in order, batched; returns once the broker holds them all.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing of the call is written.
            BrokerError: the broker failed (some messages may have been written).
        """

    @abc.abstractmethod
    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartFrom = "earliest",
        partitions: Sequence[int] | None = None,
        dead_letter_topic: str | None = None,
    ) -> Consumer:
        """Join ``group`` on ``topic``.

        Args:
            topic: the topic (created with ``default_partitions`` if missing, where allowed).
            group: the consumer group name.
            start: where a group with no state of its own begins.
            partitions: read only these partitions (manual assignment); default all.
            dead_letter_topic: where ``nack(requeue=False)`` sends; default ``TOPIC.dlq``.
        """

    @abc.abstractmethod
    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic; a no-op if it exists with the same partition count.

        Raises:
            BrokerError: if it exists with another partition count.
        """

    @abc.abstractmethod
    def delete_topic(self, topic: str) -> None:
        """Delete a topic with its messages and group state.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """

    @abc.abstractmethod
    def list_topics(self) -> list[str]:
        """Return the names of the topics, sorted."""

    @abc.abstractmethod
    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions, depth and groups (with lag) of a topic.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scheme}://>"


def dead_letter_headers(delivery: Delivery, reason: str) -> dict[str, str]:
    """Return the headers a dead-lettered copy of ``delivery`` carries."""
    headers = dict(delivery.headers)
    headers.update(
        {
            DLQ_HEADER_REASON: reason or "nacked without a reason",
            DLQ_HEADER_TOPIC: delivery.position.topic,
            DLQ_HEADER_PARTITION: str(delivery.position.partition),
            DLQ_HEADER_OFFSET: str(delivery.position.offset),
            DLQ_HEADER_COUNT: str(delivery.delivery_count),
        }
    )
    return headers


def dead_letter_copy(delivery: Delivery, reason: str) -> Message:
    """The copy of ``delivery`` for the dead-letter topic (its headers + :func:`dead_letter_headers`)."""
    return Message(delivery.payload, delivery.key, dead_letter_headers(delivery, reason))


def check_topic_name(topic: str) -> None:
    """Raise ValueError unless ``topic`` is a name every backend accepts."""
    if not isinstance(topic, str) or not topic or len(topic) > 249:
        raise ValueError(f"topic must be a non-empty str of at most 249 chars, got {topic!r}")
    bad = set(topic) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    if bad:
        raise ValueError(f"topic {topic!r} has characters outside [A-Za-z0-9._-]: {''.join(sorted(bad))!r}")


def check_trim_limits(*, max_age_s: float | None = None, max_messages: int | None = None) -> None:
    """Check the retention limits given to a backend's ``trim`` before anything is dropped.

    Args:
        max_age_s: the age limit in seconds, or None for no age limit.
        max_messages: how many messages to keep per partition, or None for no count limit.

    Raises:
        ValueError: if ``max_age_s`` is negative or NaN, or ``max_messages`` is negative.
    """
    if max_age_s is not None and not max_age_s >= 0:
        raise ValueError(f"max_age_s must be >= 0, got {max_age_s}")
    if max_messages is not None and max_messages < 0:
        raise ValueError(f"max_messages must be >= 0, got {max_messages}")


def partition_for_key(key: bytes, partitions: int) -> int:
    """Stable key -> partition mapping for backends that partition on the client side."""
    return zlib.crc32(key) % partitions
