"""``kafka://``: a log broker on Apache Kafka, through confluent-kafka (librdkafka).

``kafka://host:port[,host:port...][?options]`` (options: :class:`KafkaConfig`). How the contract
maps onto Kafka:

* A topic is a Kafka topic; ``Position.offset`` is the Kafka offset. Topics are created by infeed
  (``default_partitions``, broker-default replication, ``max.message.bytes`` sized to
  ``max_payload_bytes``) when ``publish`` or ``subscribe`` finds them missing.
* Publishing uses one idempotent producer per broker object (``enable.idempotence``, so
  ``acks=all``): ``publish_many`` produces every message, then flushes; it returns once the
  broker holds them all, else raises. Keys hash with Kafka's Java-compatible murmur2.
* A group is a Kafka consumer group (classic protocol, eager ``range`` assignor). Offsets are
  committed by infeed only (``enable.auto.commit=false``, ``enable.auto.offset.store=false``).
  ``subscribe`` returns once the member has its assignment; ``partitions=`` assigns manually.
* **Ack and commit are kept apart** (``_kafka_ledger.py``): the Kafka committed offset of a
  partition is the group's *ack watermark* (everything below is acked); its commit metadata holds
  the user's ``commit`` position, and the state of each offset between the watermark and the end
  of what was handed out (acked, or handed out k times). ``committed()`` and ``describe_topic``
  report the user's position (lag = high watermark - user commit); members resume from the
  watermark and skip what was acked. Each ``receive`` that hands something out stores the ledger
  synchronously, each ``ack`` asynchronously, a revoke or ``close`` synchronously.
  ``receive_acked`` hands out without leases and stores its acks asynchronously, at most every
  ``RECEIVE_ACKED_STORE_S`` (1 s; with a later ``receive`` call), and at ``commit``, a revoke and
  ``close``: a synchronous group commit costs the broker more CPU than reading the messages.
* **Leases and redelivery.** Kafka gives a partition to one member at a time, so a lease is kept
  by the member itself: a delivery not acked within ``ack_timeout_s``, or nacked with requeue, is
  handed out again (from memory, not re-fetched) by the member that owns the partition.
  A member that does not poll for ``max_poll_interval_s`` (default: the larger of
  ``ack_timeout_s`` and ``session_timeout_s``) or dies (``session_timeout_s``) loses its
  partitions; the next owner hands out every unacked delivery again. An ack that comes after its
  delivery was handed out again, after a rebalance took the partition, or after the member went
  ``max_poll_interval_s`` without polling raises ``LeaseLostError``.
* **delivery_count** is how many times infeed handed that offset to the group: exact while one
  member owns the partition; across owners it continues from the stored ledger, which each
  ``receive`` writes before it returns, so a member killed with SIGKILL leaves the right counts.
  Past the ledger's size cap (~3,000 characters of ranges) offsets count as never handed out.
* ``seek`` moves the owner's fetch position and its ledger (deliveries at or after the position
  are dropped; offsets skipped over count as done) and stores it. ``nack(requeue=False)``
  publishes a copy with the reason to the dead-letter topic (flushed), then acks.
* A consumer dropped without ``close()`` still leaves its group at once (a finalizer closes the
  client); otherwise every rebalance of that group would wait ``session_timeout_s`` for it.
  Members notice a rebalance within ``heartbeat_interval_s``.
* Retention is Kafka's: ``retention_max_age_s`` / ``retention_max_bytes`` on the topics infeed
  creates, and :meth:`KafkaBroker.trim` (``DeleteRecords``) on demand.
* Reconnects are librdkafka's (exponential backoff from ``reconnect_backoff_s`` to
  ``reconnect_backoff_max_s``); an operation that cannot reach the broker for the sum of
  ``reconnect_attempts`` such waits raises ``BrokerConnectionError`` naming the URL.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import confluent_kafka as ck
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from infeed.brokers._kafka_admin import OVERHEAD_BYTES, Admin
from infeed.brokers._kafka_consumer import _KafkaConsumer
from infeed.brokers._kafka_wire import Link, error_for, map_errors
from infeed.brokers._retry import backoff_total_s
from infeed.brokers._url import parse_options
from infeed.brokers.base import (
    Broker,
    BrokerConfig,
    Consumer,
    Message,
    StartFrom,
    check_headers,
    check_payload,
    check_topic_name,
    check_trim_limits,
    normalize_key,
)
from infeed.errors import BrokerError, ConfigError
from infeed.types import Capability, TopicInfo

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_RECONNECT_ATTEMPTS",
    "DEFAULT_RECONNECT_BACKOFF_MAX_S",
    "DEFAULT_RECONNECT_BACKOFF_S",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "DEFAULT_SESSION_TIMEOUT_S",
    "KafkaBroker",
    "KafkaConfig",
]

#: Seconds without heartbeats before the group gives a member's partitions to others.
DEFAULT_SESSION_TIMEOUT_S = 10.0
#: Seconds between heartbeats: how soon a member sees that a rebalance began (at most a third
#: of the session timeout).
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
#: Reconnect waits (doubling) an operation sits through before BrokerConnectionError.
DEFAULT_RECONNECT_ATTEMPTS = 10
#: First reconnect wait; doubled after each.
DEFAULT_RECONNECT_BACKOFF_S = 0.1
#: Longest reconnect wait.
DEFAULT_RECONNECT_BACKOFF_MAX_S = 10.0
#: Longest wait for one admin request or committed-offset read.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
_DEFAULT_PORT = 9092
#: Bytes a fetch may return per partition (librdkafka's default is 1 MiB). Draining 200 KB
#: messages, 8 MiB cut the broker's CPU per message ~3x (3 KB messages: ~2.5x) and the
#: consumer's ~1.6x; fetch.max.bytes and librdkafka's prefetch queue still bound the memory.
FETCH_PARTITION_BYTES = 8 << 20

_map_errors = map_errors  # the one boundary lives in _kafka_wire, shared with the consumer
_log = logging.getLogger("infeed.brokers.kafka")


@dataclass(frozen=True, kw_only=True)
class KafkaConfig(BrokerConfig):
    """Options of ``kafka://host:port[,host:port...][?options]``.

    Attributes:
        bootstrap: ``host:port`` list (from the URL).
        client_id: the client id the brokers log.
        session_timeout_s: a member silent this long (dead) loses its partitions.
        heartbeat_interval_s: seconds between heartbeats (how soon members join a rebalance);
            at most a third of ``session_timeout_s`` is used.
        max_poll_interval_s: a member that does not call ``receive`` this long is evicted and its
            partitions go to others; default the larger of ``ack_timeout_s`` and
            ``session_timeout_s``.
        join_timeout_s: longest ``subscribe`` waits for its assignment; default
            ``max_poll_interval_s + session_timeout_s + 30``.
        request_timeout_s: longest wait for one admin request or committed-offset read.
        reconnect_attempts: reconnect waits an operation sits through before it fails.
        reconnect_backoff_s: first reconnect wait, doubled after each.
        reconnect_backoff_max_s: longest reconnect wait.
        replication_factor: replicas of topics infeed creates (-1: the broker's default).
        retention_max_age_s: Kafka drops records older than this (``retention.ms`` of topics
            infeed creates; default the broker's).
        retention_max_bytes: Kafka keeps at most this many bytes per partition
            (``retention.bytes`` of topics infeed creates; default the broker's).
        linger_s: how long the producer waits to fill a batch.
        compression: producer compression codec.
    """

    bootstrap: str
    client_id: str = "infeed"
    session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    max_poll_interval_s: float | None = None
    join_timeout_s: float | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS
    reconnect_backoff_s: float = DEFAULT_RECONNECT_BACKOFF_S
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_S
    replication_factor: int = -1
    retention_max_age_s: float | None = None
    retention_max_bytes: int | None = None
    linger_s: float = 0.005
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.bootstrap:
            raise ValueError("bootstrap must name at least one host:port")
        for name in (
            "session_timeout_s",
            "request_timeout_s",
            "reconnect_backoff_s",
            "reconnect_backoff_max_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reconnect_attempts < 1:
            raise ValueError(f"reconnect_attempts must be >= 1, got {self.reconnect_attempts}")
        if self.max_poll_interval_s is not None and self.max_poll_interval_s < self.session_timeout_s:
            raise ValueError(
                f"max_poll_interval_s ({self.max_poll_interval_s}) must be >= session_timeout_s "
                f"({self.session_timeout_s})"
            )
        if self.replication_factor == 0 or self.replication_factor < -1:
            raise ValueError(f"replication_factor must be >= 1 or -1, got {self.replication_factor}")
        if self.retention_max_age_s is not None and not self.retention_max_age_s > 0:
            raise ValueError(f"retention_max_age_s must be > 0, got {self.retention_max_age_s}")
        if self.retention_max_bytes is not None and self.retention_max_bytes <= 0:
            raise ValueError(f"retention_max_bytes must be > 0, got {self.retention_max_bytes}")
        if self.linger_s < 0:
            raise ValueError(f"linger_s must be >= 0, got {self.linger_s}")

    @property
    def url(self) -> str:
        """The cluster's URL without options (for messages)."""
        return f"kafka://{self.bootstrap}"

    @property
    def max_poll_s(self) -> float:
        """``max_poll_interval_s`` with its default resolved."""
        return float(self.max_poll_interval_s or max(self.ack_timeout_s, self.session_timeout_s))

    @property
    def join_s(self) -> float:
        """``join_timeout_s`` with its default resolved."""
        return self.join_timeout_s or self.max_poll_s + self.session_timeout_s + 30.0

    @property
    def reconnect_budget_s(self) -> float:
        """Seconds of reconnect waits before an operation gives up."""
        return backoff_total_s(
            self.reconnect_attempts, self.reconnect_backoff_s, self.reconnect_backoff_max_s
        )


class KafkaBroker(Broker):
    """Log broker on Apache Kafka (``kafka://``); see the module docstring for the mapping.

    Args:
        config: connection and behaviour options; ``from_url`` builds them from a URL.

    Raises:
        BrokerConnectionError: if no broker answers within the reconnect budget.
    """

    scheme = "kafka"
    capabilities = frozenset(
        {
            Capability.REPLAY,
            Capability.SEEK,
            Capability.PER_MESSAGE_ACK,
            Capability.OFFSET_COMMIT,
            Capability.PARTITIONS,
            Capability.DEAD_LETTER,
            Capability.REDELIVERY,
            Capability.CRASH_DELIVERY_COUNT,
            Capability.MULTI_PROCESS,
            Capability.RETENTION,
        }
    )
    config: KafkaConfig

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__(config)
        cfg = self.config
        self._link = Link(
            cfg.url,
            cfg.reconnect_budget_s,
            cfg.reconnect_attempts,
            backoff_s=cfg.reconnect_backoff_s,
            backoff_max_s=cfg.reconnect_backoff_max_s,
            request_timeout_s=cfg.request_timeout_s,
        )
        self._lock = threading.Lock()
        self._consumers: weakref.WeakSet[_KafkaConsumer] = weakref.WeakSet()
        self._closed = False
        with map_errors(cfg.url, "creating the clients"):
            try:
                self._admin = Admin(AdminClient(self._client_conf()), self._link, cfg)
                self._producer = ck.Producer(self._producer_conf())
            except KafkaException as exc:
                raise ConfigError(f"{cfg.url}: the Kafka client refused its settings: {exc}") from exc
        self._admin.names()  # BrokerConnectionError naming the URL after the reconnect budget
        self._link.up()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Connect from ``kafka://host:port[,host:port...][?options]``.

        Raises:
            ConfigError: for a path, credentials, a bad host list or a bad option.
        """
        parts = urlsplit(url)
        if parts.scheme != "kafka":
            raise ConfigError(f"not a kafka URL: {url!r}")
        if "@" in parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"kafka URL {url!r}: expected kafka://host:port[,host:port...][?options]")
        hosts = []
        for item in parts.netloc.split(","):
            host, _, port = (
                item.strip().rpartition(":") if ":" in item else (item.strip(), "", str(_DEFAULT_PORT))
            )
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"kafka URL {url!r}: bad host:port {item!r}")
            hosts.append(f"{host}:{port}")
        return cls(parse_options(parts.query, KafkaConfig, bootstrap=",".join(hosts)))

    def __repr__(self) -> str:
        return f"<KafkaBroker {self.config.url}>"

    # -- clients --------------------------------------------------------------------------------

    def _client_conf(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "bootstrap.servers": cfg.bootstrap,
            "client.id": cfg.client_id,
            "allow.auto.create.topics": False,
            "reconnect.backoff.ms": max(1, int(cfg.reconnect_backoff_s * 1000)),
            "reconnect.backoff.max.ms": max(1, int(cfg.reconnect_backoff_max_s * 1000)),
            "error_cb": self._link.on_error,
            "logger": _log,
        }

    def _producer_conf(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self._client_conf(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": cfg.linger_s * 1000,
            "compression.type": cfg.compression,
            "message.timeout.ms": int(cfg.reconnect_budget_s * 1000),
            "message.max.bytes": max(1_000_000, cfg.max_payload_bytes + OVERHEAD_BYTES),
            "queue.buffering.max.messages": 1_000_000,
            "partitioner": "murmur2_random",
            "delivery.report.only.error": True,
        }

    def _consumer_conf(self, group: str) -> dict[str, Any]:
        cfg = self.config
        return {
            **self._client_conf(),
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Not cooperative-sticky: with it, librdkafka 2.16 lets a member evicted for
            # max.poll.interval.ms rejoin still fetching partitions the group gave to another
            # member (seen here; confluentinc/librdkafka PR #5604). Eager rebalances revoke all.
            "partition.assignment.strategy": "range",
            "session.timeout.ms": int(cfg.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(cfg.heartbeat_interval_s, cfg.session_timeout_s / 3) * 1000),
            "max.poll.interval.ms": int(cfg.max_poll_s * 1000),
            "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
            "fetch.max.bytes": max(52_428_800, cfg.max_payload_bytes + OVERHEAD_BYTES),
            "receive.message.max.bytes": max(100_000_000, 2 * (cfg.max_payload_bytes + OVERHEAD_BYTES)),
            # librdkafka pauses fetching for this long when its prefetch queue is full (1 s default)
            "fetch.queue.backoff.ms": 20,
            "on_commit": _on_commit,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(f"{self.config.url}: broker is closed")

    # -- topics -----------------------------------------------------------------------------------

    def _ensure_topic(self, topic: str) -> int:
        return self._admin.partitions(topic)

    def _extents(self, topic: str, partitions: Sequence[int]) -> tuple[dict[int, int], dict[int, int]]:
        return self._admin.extents(topic, partitions)

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` partitions (a no-op if it exists alike).

        Raises:
            BrokerError: if it exists with another partition count.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        self._check_open()
        self._admin.create(topic, partitions, strict=True)

    def delete_topic(self, topic: str) -> None:
        """Delete a topic; Kafka drops its messages and the groups' offsets with it.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        self._check_open()
        self._admin.delete(topic)

    def list_topics(self) -> list[str]:
        """Return topic names, sorted (Kafka's internal ``__`` topics left out)."""
        self._check_open()
        return self._admin.names()

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions (watermarks) and groups (user commits, lag, unacked) of ``topic``.

        A group's ``committed`` and ``lag`` are from its ``commit`` positions; ``pending`` is the
        unacked count as last stored by the members.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        self._check_open()
        return self._admin.describe(topic)

    def trim(
        self,
        topic: str,
        *,
        committed: bool = True,
        max_age_s: float | None = None,
        max_messages: int | None = None,
    ) -> int:
        """Delete old records of every partition of ``topic`` (Kafka ``DeleteRecords``).

        Kafka's own retention (``retention_max_age_s``, ``retention_max_bytes`` on topics infeed
        creates) runs on the broker; this drops records on demand.

        Args:
            topic: the topic.
            committed: drop what every group has ``commit``-ed past (a group that never
                committed keeps everything).
            max_age_s: drop records published more than this many seconds ago.
            max_messages: keep only the newest this many records per partition.

        Returns:
            how many records were dropped.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)
        self._check_open()
        return self._admin.trim(topic, committed=committed, max_age_s=max_age_s, max_messages=max_messages)

    # -- publish ----------------------------------------------------------------------------------

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Produce every message, then flush; returns once the broker holds them all.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing of the call is written.
            BrokerConnectionError: the broker stayed out of reach for the reconnect budget
                (messages of the call may have been written).
            BrokerError: the broker refused a message.
        """
        check_topic_name(topic)
        limit = self.config.max_payload_bytes
        items: list[Message | bytes] = messages if isinstance(messages, list) else list(messages)
        plain = all(type(m) is bytes and len(m) <= limit for m in items)  # the common case
        prepared: list[tuple[bytes, bytes | None, Any, int | None]] = []
        if not plain:
            for m in items:
                msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
                payload = check_payload(msg.payload, limit)
                key, headers = normalize_key(msg.key), check_headers(msg.headers) or None
                prepared.append((payload, key, headers, msg.partition))
        self._check_open()
        if not items:
            return
        n = self._ensure_topic(topic)
        for _, _, _, partition in prepared:
            if partition is not None and not 0 <= partition < n:
                raise ValueError(f"partition {partition} out of range 0..{n - 1} of {topic!r}")
        failed: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failed.append(err)

        self._link.check_fatal()
        send: Any = self._producer.produce
        url = self.config.url
        with map_errors(url, f"publishing to {topic!r}"):
            if plain:
                for value in items:
                    try:
                        send(topic, value, on_delivery=on_delivery)
                    except BufferError:
                        self._send_when_room(send, (topic, value), on_delivery, None)
            for payload, key, headers, partition in prepared:
                part = -1 if partition is None else partition  # -1: the partitioner picks
                try:
                    send(topic, payload, key, part, on_delivery=on_delivery, headers=headers)
                except BufferError:
                    self._send_when_room(send, (topic, payload, key, part), on_delivery, headers)
            left = self._producer.flush(self._link.budget_s + self.config.request_timeout_s)
        if failed:
            err = failed[0]
            if err.code() == KafkaError._MSG_TIMED_OUT and self._link.down:
                raise self._link.gone(err)
            raise error_for(err, url, f"{len(failed)} of {len(items)} messages to {topic!r} failed")
        if left:
            raise self._link.gone()
        self._link.up()

    def _send_when_room(self, send: Any, args: tuple[Any, ...], on_delivery: Any, headers: Any) -> None:
        """Produce one message once the local queue has room, serving deliveries meanwhile."""
        while True:
            self._producer.poll(0.05)
            try:
                send(*args, on_delivery=on_delivery, headers=headers)
                return
            except BufferError:
                continue

    # -- consume ----------------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartFrom = "earliest",
        partitions: Sequence[int] | None = None,
        dead_letter_topic: str | None = None,
    ) -> Consumer:
        """Join ``group`` on ``topic``; returns once the member has its partitions.

        Args:
            topic: the topic (created with ``default_partitions`` if missing).
            group: the consumer group name.
            start: where a group with no stored position on a partition begins.
            partitions: read only these partitions (manual assignment, no rebalances); a group
                is either subscribed or manually assigned, not both at once (Kafka refuses the
                commits of a manual member while subscribed members are active).
            dead_letter_topic: where ``nack(requeue=False)`` sends; default ``TOPIC.dlq``.
        """
        check_topic_name(topic)
        if not group or not isinstance(group, str):
            raise ValueError(f"group must be a non-empty string, got {group!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if dead_letter_topic is not None:
            check_topic_name(dead_letter_topic)
        self._check_open()
        n = self._ensure_topic(topic)
        chosen = None
        if partitions is not None:
            chosen = list(dict.fromkeys(partitions))
            if not chosen:
                raise ValueError("partitions must name at least one partition (or be None for all)")
            for p in chosen:
                if not 0 <= p < n:
                    raise ValueError(f"partition {p} out of range 0..{n - 1} of {topic!r}")
        consumer = _KafkaConsumer(
            self, topic, group, dead_letter_topic, partitions=chosen, start=start, n_partitions=n
        )
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Close this object's consumers, flush the producer, release the clients. Idempotent."""
        if self._closed:
            return
        with self._lock:
            consumers = list(self._consumers)
        try:
            for c in consumers:
                c.close()
        finally:
            self._closed = True
            if self._producer.flush(min(5.0, self._link.budget_s)) == 0:
                self._producer.close()


def _on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    """Result of an asynchronous ledger write; a failed one only means redeliveries later."""
    if err is not None and err.code() != KafkaError._NO_OFFSET:
        _log.info("kafka: storing acks failed (%s); they are delivered again", err)
