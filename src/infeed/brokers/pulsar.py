"""``pulsar://``: a log broker on Apache Pulsar (pulsar-client, plus the broker's admin REST API).

``pulsar://HOST:PORT?admin_url=http://HOST:WEBPORT&options`` (``admin_url`` defaults to port 8080
of the same host: the binary protocol cannot tell where the web service is). How the contract maps
onto Pulsar:

* A topic is a partitioned topic ``persistent://NAMESPACE/TOPIC`` with N partitions (even N = 1),
  created through the admin API. The namespace (``public/infeed`` by default) is created with a
  retention policy that keeps acknowledged messages forever unless ``retention_max_age_s`` /
  ``retention_max_mb`` say otherwise, so a new group can start from the earliest message.
  infeed produces to and consumes from each partition topic ``TOPIC-partition-I`` itself: keys go
  to ``partition_for_key`` (the same hash as every backend), keyless messages round-robin,
  ``Message.partition`` is honoured.
* ``Position.offset`` packs the message id: ``ledger << 64 | entry << 20 | batch_index``
  (``_pulsar_wire.py``). Offsets grow with the partition's order but are sparse; ``lag`` counts
  entries (= messages unless ``batching=true``).
* A group is a durable subscription named after it (``subscription_type``: ``shared`` by default,
  ``key_shared`` or ``failover``), created at ``subscribe`` at the earliest or latest message.
* Leases, their expiry after ``ack_timeout_s``, stale-ack detection and delivery counts are kept by
  the client (``_pulsar_consumer.py``): Pulsar's ack timeout cannot go below 10 s and a late ack
  of a redelivered message is accepted silently. ``delivery_count`` is Pulsar's redelivery count
  + 1, or more where this process gave the message back before: Pulsar does not count a
  redelivery after a consumer closed or died (apache/pulsar#8722), so after a crash of another
  process the count restarts. Hence ``Capability.CRASH_DELIVERY_COUNT`` is not declared: a
  message held by a SIGKILLed process comes back to another member (``REDELIVERY`` holds), but
  with the count it had before that delivery. ``ack`` is Pulsar's individual ack (flushed within 0.1 s);
  ``ack_cumulative`` (failover subscriptions) is its cumulative ack; ``nack(requeue=True)`` is its
  negative ack (redelivered after ``negative_ack_redelivery_delay_s``, at least ~0.1 s).
* ``nack(requeue=False)`` publishes a copy with ``dead_letter_headers`` to the dead-letter topic,
  then acks: Pulsar's own DeadLetterPolicy cannot carry a reason. The dead-letter policy is
  ``max_deliveries``: a message that comes back after that many deliveries is dead-lettered the
  same way (reason ``delivered N times``) by the member that receives it, instead of handed out.
* ``commit`` stores the offset as a property of the subscription on each partition (kept with the
  subscription's cursor, on the broker); it never acks. ``seek`` resets the subscription cursor
  (the whole group moves); a position inside a batch entry replays the entry and drops the
  messages before it in the seeking member.
* Producers (``_pulsar_producer.py``) send asynchronously and wait for every receipt (the broker
  has the messages in its bookie); failed sends are retried with backoff (at-least-once).
  Producer batching is off by default: with it on, an entry holds many messages and Pulsar
  redelivers a nacked or expired message with its whole batch unless the broker runs
  ``acknowledgmentAtBatchIndexLevelEnabled``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import pulsar

from infeed.brokers._pulsar_admin import COMMITTED_PROPERTY, Admin, entries_from, extent
from infeed.brokers._pulsar_consumer import _PulsarConsumer
from infeed.brokers._pulsar_leases import DeliveryCounts, Reaper
from infeed.brokers._pulsar_producer import CHUNK, Producers
from infeed.brokers._pulsar_wire import Retry, encode_key, pack, retrying
from infeed.brokers._pulsar_wire import (
    _map_errors as _map_errors,  # the error boundary, re-exported
)
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
    normalize_key,
    partition_for_key,
)
from infeed.errors import BrokerConnectionError, BrokerError, ConfigError, TopicNotFoundError
from infeed.types import Capability, GroupInfo, PartitionInfo, TopicInfo

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "DEFAULT_NAMESPACE", "PulsarBroker", "PulsarConfig"]

#: Largest payload: the broker's default ``maxMessageSize`` (5 MiB) less room for the metadata.
DEFAULT_MAX_PAYLOAD_BYTES = 5 * 1024 * 1024 - 64 * 1024
#: infeed's namespace (created with the retention options if missing).
DEFAULT_NAMESPACE = "public/infeed"
#: Reconnect attempts of one operation before it raises BrokerConnectionError.
DEFAULT_RECONNECT_ATTEMPTS = 12
#: Wait before the first reconnect attempt; doubled after each failed one.
DEFAULT_RECONNECT_BACKOFF_S = 0.1
#: Longest wait between two reconnect attempts.
DEFAULT_RECONNECT_BACKOFF_MAX_S = 5.0
#: Messages a partition's consumer prefetches (pulsar-client's receiver queue).
DEFAULT_RECEIVER_QUEUE_SIZE = 1000
#: Longest a send waits for the broker (pulsar-client reconnects meanwhile) before it is retried.
DEFAULT_SEND_TIMEOUT_S = 30.0
#: Longest the client waits for a lookup, subscribe or producer creation.
DEFAULT_OPERATION_TIMEOUT_S = 30.0
#: Longest one admin API request may take.
DEFAULT_ADMIN_TIMEOUT_S = 10.0
#: Deliveries of a message before a member dead-letters it instead of handing it out (0: no limit).
DEFAULT_MAX_DELIVERIES = 0

_KINDS = {
    "shared": pulsar.ConsumerType.Shared,
    "key_shared": pulsar.ConsumerType.KeyShared,
    "failover": pulsar.ConsumerType.Failover,
}
_LOG_LEVELS = {
    "debug": pulsar.LoggerLevel.Debug,
    "info": pulsar.LoggerLevel.Info,
    "warn": pulsar.LoggerLevel.Warn,
    "error": pulsar.LoggerLevel.Error,
}


@dataclass(frozen=True, kw_only=True)
class PulsarConfig(BrokerConfig):
    """Options of ``pulsar://host:port?options``.

    Attributes:
        service_url: the binary protocol URL (from the URL, without options).
        admin_url: the broker's web service (admin REST API); default ``http://HOST:8080``.
        namespace: ``tenant/namespace`` of infeed's topics; created if missing, with the retention
            options as its policy (an existing namespace keeps its own).
        subscription_type: ``shared`` (members compete for messages), ``key_shared`` (one member
            per key) or ``failover`` (one active member per partition; cumulative acks).
        receiver_queue_size: messages each partition's consumer prefetches.
        max_deliveries: the dead-letter policy: a message that comes back after this many
            deliveries is published to the group's dead-letter topic (reason and count in the
            ``x-infeed-dlq-*`` headers) and acked instead of being handed out again (0: no limit).
            It counts what ``delivery_count`` counts (not redeliveries after a consumer crash).
        negative_ack_redelivery_delay_s: delay before a nacked message is redelivered
            (pulsar-client's timer adds up to ~0.1 s).
        batching: let producers batch messages into one entry (faster; see the module docstring).
        batching_max_messages: most messages per batch.
        batching_max_delay_s: longest a message waits for its batch to fill.
        send_timeout_s: longest a send waits for the broker before it is retried.
        operation_timeout_s: longest a lookup, subscribe or producer creation waits.
        admin_timeout_s: longest one admin API request waits.
        reconnect_attempts: retries of an operation that cannot reach the broker.
        reconnect_backoff_s: wait before the first retry, doubled after each.
        reconnect_backoff_max_s: longest wait between two retries.
        retention_max_age_s: in a namespace infeed creates, drop acknowledged messages older than
            this (None: keep them, so a new group can replay from the start).
        retention_max_mb: in a namespace infeed creates, drop the oldest acknowledged messages
            past this size (None: keep them).
        client_log_level: what pulsar-client itself prints to stderr.
    """

    service_url: str
    admin_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    subscription_type: Literal["shared", "key_shared", "failover"] = "shared"
    receiver_queue_size: int = DEFAULT_RECEIVER_QUEUE_SIZE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    negative_ack_redelivery_delay_s: float = 0.0
    batching: bool = False
    batching_max_messages: int = 1000
    batching_max_delay_s: float = 0.005
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    operation_timeout_s: float = DEFAULT_OPERATION_TIMEOUT_S
    admin_timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S
    reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS
    reconnect_backoff_s: float = DEFAULT_RECONNECT_BACKOFF_S
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_S
    retention_max_age_s: float | None = None
    retention_max_mb: int | None = None
    client_log_level: Literal["debug", "info", "warn", "error"] = "warn"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.service_url.startswith(("pulsar://", "pulsar+ssl://")):
            raise ValueError(f"service_url must be pulsar://HOST:PORT, got {self.service_url!r}")
        if not self.admin_url.startswith(("http://", "https://")):
            raise ValueError(f"admin_url must be http(s)://HOST:PORT, got {self.admin_url!r}")
        if self.namespace.count("/") != 1 or not all(self.namespace.split("/")):
            raise ValueError(f"namespace must be TENANT/NAMESPACE, got {self.namespace!r}")
        for name in ("send_timeout_s", "operation_timeout_s", "admin_timeout_s", "batching_max_delay_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.receiver_queue_size < 1 or not 1 <= self.batching_max_messages < 2**20:
            raise ValueError("receiver_queue_size must be >= 1 and batching_max_messages in 1..2**20-1")
        if self.max_deliveries < 0:
            raise ValueError(f"max_deliveries must be >= 0 (0: no limit), got {self.max_deliveries}")
        if self.negative_ack_redelivery_delay_s < 0 or self.reconnect_attempts < 0:
            raise ValueError("negative_ack_redelivery_delay_s and reconnect_attempts must be >= 0")
        if self.reconnect_backoff_s < 0 or self.reconnect_backoff_max_s < 0:
            raise ValueError("reconnect_backoff_s and reconnect_backoff_max_s must be >= 0")
        for name in ("retention_max_age_s", "retention_max_mb"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


class PulsarBroker(Broker):
    """Log broker on Apache Pulsar (``pulsar://``).

    Args:
        config: connection and behaviour options; ``from_url`` builds them from a URL.

    Raises:
        BrokerConnectionError: if the admin API cannot be reached (after the reconnect attempts).
        ConfigError: if the namespace does not exist.
    """

    scheme = "pulsar"
    capabilities = frozenset(
        {
            Capability.REPLAY,
            Capability.SEEK,
            Capability.PER_MESSAGE_ACK,
            Capability.OFFSET_COMMIT,
            Capability.PARTITIONS,
            Capability.DEAD_LETTER,
            Capability.REDELIVERY,
            Capability.MULTI_PROCESS,
            Capability.RETENTION,
        }
    )

    def __init__(self, config: PulsarConfig) -> None:
        super().__init__(config)
        self.config: PulsarConfig = config
        self._where = config.service_url
        self._retry = Retry(
            config.reconnect_attempts, config.reconnect_backoff_s, config.reconnect_backoff_max_s
        )
        self._admin = Admin(
            config.admin_url,
            config.namespace,
            timeout_s=config.admin_timeout_s,
            retry=self._retry,
            where=self._where,
        )
        minutes = -1 if config.retention_max_age_s is None else math.ceil(config.retention_max_age_s / 60)
        size_mb = -1 if config.retention_max_mb is None else config.retention_max_mb
        try:
            self._admin.ensure_namespace(minutes, size_mb)
        except TopicNotFoundError as exc:
            raise ConfigError(
                f"tenant of namespace {config.namespace!r} does not exist on {config.admin_url}"
            ) from exc
        except BrokerConnectionError as exc:
            raise BrokerConnectionError(
                f"{exc} -- infeed needs the broker's admin API (web service) besides "
                f"{config.service_url}: pass ?admin_url=http://HOST:WEBPORT if it is not on port 8080"
            ) from exc
        with _map_errors(self._where):
            self._client = pulsar.Client(
                config.service_url,
                operation_timeout_seconds=max(1, math.ceil(config.operation_timeout_s)),
                # pulsar-client's own console logger: a Python logger can abort the interpreter at
                # exit when a client thread logs during shutdown (seen with pulsar-client 3.13)
                logger=pulsar.ConsoleLogger(_LOG_LEVELS[config.client_log_level]),
            )
        self._lock = threading.Lock()
        self._producers = Producers(self._client, config, self._retry, self._where, self._partition_name)
        self._partition_counts: dict[str, int] = {}
        self._spread = itertools.count()
        self._consumers: weakref.WeakSet[_PulsarConsumer] = weakref.WeakSet()
        self._reaper = Reaper()
        self._counts = DeliveryCounts()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Connect from ``pulsar://host:port?admin_url=http://host:webport&options``.

        Raises:
            ConfigError: for a path, a missing host, or a bad option.
            BrokerConnectionError: if the broker cannot be reached.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("pulsar", "pulsar+ssl") or not parts.hostname:
            raise ConfigError(f"not a pulsar URL: {url!r}; expected pulsar://HOST:PORT")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"pulsar URL {url!r} takes no path: put options in the query")
        fixed: dict[str, Any] = {"service_url": f"{parts.scheme}://{parts.netloc}"}
        if "admin_url=" not in parts.query:
            fixed["admin_url"] = f"http://{parts.hostname}:8080"
        return cls(parse_options(parts.query, PulsarConfig, **fixed))

    def __repr__(self) -> str:
        return f"<PulsarBroker {self.config.service_url}>"

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError("broker is closed")

    # -- names and partitions -----------------------------------------------------------------

    @staticmethod
    def _partition_short(topic: str, partition: int) -> str:
        return f"{topic}-partition-{partition}"

    def _partition_name(self, topic: str, partition: int) -> str:
        return f"persistent://{self.config.namespace}/{topic}-partition-{partition}"

    def _partitions(self, topic: str, *, create: bool) -> int:
        """Partition count of ``topic`` (cached), creating it with ``default_partitions`` if asked."""
        check_topic_name(topic)
        if "-partition-" in topic:
            raise ValueError(f"topic {topic!r}: Pulsar reserves '-partition-' in topic names")
        count = self._partition_counts.get(topic)
        if count is None:
            count = self._admin.partitions(topic)
            if count is None:
                if not create:
                    raise TopicNotFoundError(
                        f"no topic {topic!r} in {self.config.namespace} on {self._where}"
                    )
                self._create(topic, self.config.default_partitions)
                count = self._admin.partitions(topic) or self.config.default_partitions
            if count == 0:
                raise BrokerError(
                    f"{topic!r} exists as a non-partitioned Pulsar topic; infeed needs a partitioned one"
                )
            self._partition_counts[topic] = count
        return count

    def _create(self, topic: str, partitions: int) -> None:
        created = self._admin.create_topic(topic, partitions)
        existing = self._admin.partitions(topic) if not created else partitions
        if existing != partitions and not created and existing is not None:
            raise BrokerError(f"topic {topic!r} exists with {existing} partitions, not {partitions}")

    def _high(self, topic: str, partition: int) -> int:
        """One past the last offset written to a partition (``PartitionInfo.high``; see ``extent``).

        When the partition's current ledger holds nothing yet, the first offset of that ledger:
        past the last message, and before anything written next.
        """
        ledger, entry, batch = self._admin.last_message_id(self._partition_short(topic, partition))
        if entry < 0:
            return pack(max(ledger, 0), 0, 0)
        return pack(ledger, entry, max(batch, 0)) + 1

    # -- topics -------------------------------------------------------------------------------

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a partitioned topic (a no-op if it exists with as many partitions).

        Raises:
            BrokerError: if it exists with another partition count.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        self._check_open()
        self._create(topic, partitions)
        self._partition_counts[topic] = partitions

    def delete_topic(self, topic: str) -> None:
        """Delete a topic with its messages and subscriptions.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        check_topic_name(topic)
        self._check_open()
        self._producers.drop_topic(topic)
        self._partition_counts.pop(topic, None)
        self._admin.delete_topic(topic)

    def list_topics(self) -> list[str]:
        """Return the names of infeed's (partitioned) topics in the namespace, sorted."""
        self._check_open()
        return sorted(t for t in self._admin.list_topics() if not t.startswith("__"))

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions (entries held), groups (committed offsets, lag, unacked) of ``topic``.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        self._check_open()
        count = self._partitions(topic, create=False)
        internal = self._admin.internal_stats(topic).get("partitions", {})
        stats = self._admin.stats(topic).get("partitions", {})
        partitions: list[PartitionInfo] = []
        ledgers: list[list[tuple[int, int]]] = []
        subs: dict[str, dict[int, dict[str, Any]]] = {}
        for i in range(count):
            name = self._partition_name(topic, i)
            short = self._partition_short(topic, i)
            info, held = extent(i, internal.get(name, {}), functools.partial(self._admin.batch_size, short))
            partitions.append(info)
            ledgers.append(held)
            for sub, sub_stats in stats.get(name, {}).get("subscriptions", {}).items():
                subs.setdefault(sub, {})[i] = sub_stats
        groups = []
        for sub, by_partition in sorted(subs.items()):
            committed = {
                i: int(s["subscriptionProperties"][COMMITTED_PROPERTY])
                for i, s in by_partition.items()
                if COMMITTED_PROPERTY in (s.get("subscriptionProperties") or {})
            }
            lag = {
                i: entries_from(ledgers[i], committed[i]) if i in committed else int(s.get("msgBacklog", 0))
                for i, s in by_partition.items()
            }
            pending = sum(int(s.get("unackedMessages", 0)) for s in by_partition.values())
            groups.append(GroupInfo(sub, committed, lag, pending))
        return TopicInfo(topic, tuple(partitions), tuple(groups))

    # -- publish ------------------------------------------------------------------------------

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Send messages in order (asynchronously) and wait until the broker holds every one.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing of the call is written.
            BrokerConnectionError: if the broker stays unreachable past the reconnect attempts
                (some messages may have been written).
        """
        check_topic_name(topic)
        limit = self.config.max_payload_bytes
        prepared: list[tuple[bytes, bytes | None, dict[str, str], int | None]] = []
        for m in messages:
            if type(m) is bytes and len(m) <= limit:
                prepared.append((m, None, {}, None))
                continue
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            payload = check_payload(msg.payload, limit)
            prepared.append((payload, normalize_key(msg.key), check_headers(msg.headers), msg.partition))
        self._check_open()
        if not prepared:
            return
        count = self._partitions(topic, create=True)
        items = [
            (self._route(partition, key, count), payload, encode_key(key, headers), headers)
            for payload, key, headers, partition in prepared
        ]
        for lo in range(0, len(items), CHUNK):
            self._producers.send(topic, items[lo : lo + CHUNK])

    def _route(self, partition: int | None, key: bytes | None, count: int) -> int:
        if partition is not None:
            if not 0 <= partition < count:
                raise ValueError(f"partition {partition} out of range 0..{count - 1}")
            return partition
        if key is not None:
            return partition_for_key(key, count)
        return next(self._spread) % count

    # -- consume ------------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartFrom = "earliest",
        partitions: Sequence[int] | None = None,
        dead_letter_topic: str | None = None,
    ) -> Consumer:
        """Join ``group`` (a durable subscription) on ``topic``, created if missing.

        Args:
            topic: the topic.
            group: the consumer group name (the subscription name).
            start: where a group with no state yet begins: ``earliest`` or ``latest``.
            partitions: read only these partitions (manual assignment); default all.
            dead_letter_topic: where ``nack(requeue=False)`` sends; default ``TOPIC.dlq``.
        """
        if not group or not isinstance(group, str):
            raise ValueError(f"group must be a non-empty string, got {group!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if dead_letter_topic is not None:
            check_topic_name(dead_letter_topic)
        self._check_open()
        count = self._partitions(topic, create=True)
        chosen = list(range(count)) if partitions is None else list(dict.fromkeys(partitions))
        if not chosen:
            raise ValueError("partitions must name at least one partition (or be None for all)")
        for p in chosen:
            if not 0 <= p < count:
                raise ValueError(f"partition {p} out of range 0..{count - 1} of {topic!r}")
        self._admin.create_subscription(topic, group, latest=start == "latest")
        consumer = _PulsarConsumer(self, topic, group, chosen, count, dead_letter_topic)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def _open_consumer(self, partition_name: str, group: str) -> Any:
        cfg = self.config

        def subscribe() -> Any:
            with _map_errors(self._where):
                return self._client.subscribe(
                    partition_name,
                    group,
                    consumer_type=_KINDS[cfg.subscription_type],
                    receiver_queue_size=cfg.receiver_queue_size,
                    negative_ack_redelivery_delay_ms=int(cfg.negative_ack_redelivery_delay_s * 1000),
                    initial_position=pulsar.InitialPosition.Earliest,
                    start_message_id_inclusive=True,
                    # acks of single messages in a batch stick where the broker has
                    # acknowledgmentAtBatchIndexLevelEnabled; elsewhere the whole batch comes back
                    batch_index_ack_enabled=True,
                )

        return retrying(self._retry, self._where, f"subscribe {group!r} to {partition_name}", subscribe)

    def close(self) -> None:
        """Close consumers (their unacked messages go to other members), producers and the client."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            consumers = list(self._consumers)
        try:
            for c in consumers:
                c.close()
            self._producers.close()
        finally:
            self._reaper.stop()
            with contextlib.suppress(pulsar.PulsarException):
                self._client.close()
