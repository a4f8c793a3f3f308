"""The admin side of the ``kafka://`` backend: topics, watermarks, group offsets, trimming."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic

from infeed.brokers._kafka_ledger import Saved, decode
from infeed.brokers._kafka_wire import Link, map_errors
from infeed.errors import BrokerError, TopicNotFoundError
from infeed.types import GroupInfo, PartitionInfo, TopicInfo

if TYPE_CHECKING:
    from infeed.brokers.kafka import KafkaConfig

__all__ = ["OVERHEAD_BYTES", "Admin"]

#: Bytes a message may need beyond its payload (batch header, key, headers) in max.message.bytes.
OVERHEAD_BYTES = 64 * 1024
_EARLIEST: Any = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]
T = TypeVar("T")


class Admin:
    """Topic and group administration for one broker object, with its partition-count cache."""

    def __init__(self, client: AdminClient, link: Link, config: KafkaConfig) -> None:
        self._client = client
        self._link = link
        self._cfg = config
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def retry(self, doing: str, fn: Callable[[float], T]) -> T:
        """Run an admin request ``fn(timeout_s)``, again while the broker is out of reach."""
        return self._link.retry(doing, fn)

    # -- topics ---------------------------------------------------------------------------------

    def partitions(self, topic: str) -> int:
        """Return the partition count of ``topic``, creating it if missing."""
        n = self._counts.get(topic)
        return n if n is not None else self.create(topic, self._cfg.default_partitions, strict=False)

    def create(self, topic: str, partitions: int, *, strict: bool) -> int:
        """Create ``topic`` (a no-op if it exists); return its partition count once all have leaders.

        Raises:
            BrokerError: ``strict`` and the topic exists with another partition count.
        """
        cfg = self._cfg
        config = {"max.message.bytes": str(cfg.max_payload_bytes + OVERHEAD_BYTES)}
        if cfg.retention_max_age_s is not None:
            config["retention.ms"] = str(int(cfg.retention_max_age_s * 1000))
        if cfg.retention_max_bytes is not None:
            config["retention.bytes"] = str(cfg.retention_max_bytes)
        new = NewTopic(
            topic, num_partitions=partitions, replication_factor=cfg.replication_factor, config=config
        )

        def ask(timeout: float) -> None:
            future = self._client.create_topics([new], request_timeout=timeout)[topic]
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

        self.retry(f"creating topic {topic!r}", ask)
        n = self._wait_for_topic(topic)
        if strict and n != partitions:
            raise BrokerError(f"topic {topic!r} exists with {n} partitions, not {partitions}")
        with self._lock:
            self._counts[topic] = n
        return n

    def metadata(self, topic: str) -> Any:
        """The topic's metadata.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        cluster = self.retry(f"metadata of {topic!r}", lambda t: self._client.list_topics(topic, timeout=t))
        meta = cluster.topics.get(topic)
        if meta is None or meta.error is not None:
            raise TopicNotFoundError(f"no topic {topic!r} on {self._cfg.url}")
        return meta

    def _wait_for_topic(self, topic: str) -> int:
        """Wait until every partition of a new topic has a leader; return the count."""
        deadline = time.monotonic() + self._cfg.request_timeout_s
        while True:
            try:
                meta = self.metadata(topic)
                if meta.partitions and all(p.leader >= 0 for p in meta.partitions.values()):
                    return len(meta.partitions)
            except TopicNotFoundError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic!r} on {self._cfg.url} has partitions without a leader")
            time.sleep(0.05)

    def delete(self, topic: str) -> None:
        """Delete ``topic`` and wait until it is no longer listed (Kafka deletes asynchronously).

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        cfg = self._cfg
        with self._lock:
            self._counts.pop(topic, None)
        with map_errors(cfg.url, f"deleting topic {topic!r}"):
            future = self._client.delete_topics([topic], request_timeout=cfg.request_timeout_s)[topic]
            future.result(cfg.request_timeout_s)
        deadline = time.monotonic() + cfg.request_timeout_s
        while topic in self.names():
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic!r} on {cfg.url} is still listed after its deletion")
            time.sleep(0.05)

    def names(self) -> list[str]:
        """Topic names, sorted (Kafka's internal ``__`` topics left out)."""
        topics = self.retry("listing topics", lambda t: self._client.list_topics(timeout=t)).topics
        return sorted(t for t in topics if not t.startswith("__"))

    # -- offsets --------------------------------------------------------------------------------

    def offsets(self, topic: str, partitions: Sequence[int], spec: Any) -> dict[int, int]:
        """The offset ``spec`` names in each partition (earliest, latest, at a time)."""
        asked = {TopicPartition(topic, p): spec for p in partitions}
        tries = 0

        def ask(timeout: float) -> dict[int, int]:
            nonlocal tries
            if tries:
                # After a leader moved, librdkafka's admin client keeps sending the old leader
                # epoch (FENCED_LEADER_EPOCH until the budget runs out) unless metadata is fetched.
                self._client.list_topics(topic, timeout=timeout)
            tries += 1
            futures = self._client.list_offsets(asked, request_timeout=timeout)
            return {tp.partition: f.result(timeout).offset for tp, f in futures.items()}

        return self.retry(f"offsets of {topic!r}", ask)

    def extents(self, topic: str, partitions: Sequence[int]) -> tuple[dict[int, int], dict[int, int]]:
        """Low and high watermarks of ``partitions`` of ``topic``."""
        return self.offsets(topic, partitions, _EARLIEST), self.offsets(topic, partitions, _LATEST)

    def group_offsets(self, topic: str, partitions: list[int]) -> dict[str, dict[int, Saved]]:
        """Group -> partition -> stored ledger, for the groups with commits on ``topic``."""

        def ask(timeout: float) -> dict[str, dict[int, Saved]]:
            listing = self._client.list_consumer_groups(request_timeout=timeout).result(timeout)
            asked = [TopicPartition(topic, p) for p in partitions]
            futures: dict[str, Future[Any]] = {}
            for name in sorted(g.group_id for g in listing.valid):  # one request per group, all at once
                request = [ConsumerGroupTopicPartitions(name, asked)]
                futures.update(self._client.list_consumer_group_offsets(request, request_timeout=timeout))
            out = {}
            for name, future in futures.items():
                saved = {
                    tp.partition: decode(tp.offset, tp.metadata)
                    for tp in future.result(timeout).topic_partitions
                    if tp.offset >= 0 and tp.error is None
                }
                if saved:
                    out[name] = saved
            return out

        return self.retry("listing groups' offsets", ask)

    def describe(self, topic: str) -> TopicInfo:
        """Partitions (watermarks) and groups (user commits, lag, unacked as stored) of ``topic``."""
        partitions = sorted(self.metadata(topic).partitions)
        lows, highs = self.extents(topic, partitions)
        parts = tuple(PartitionInfo(p, lows[p], highs[p], highs[p] - lows[p]) for p in partitions)
        groups = []
        for name, saved in self.group_offsets(topic, partitions).items():
            committed = {p: s.commit for p, s in saved.items() if s.commit is not None}
            lag = {p: highs[p] - max(committed.get(p, lows[p]), lows[p]) for p in partitions}
            groups.append(GroupInfo(name, committed, lag, sum(s.unacked for s in saved.values())))
        return TopicInfo(topic, parts, tuple(groups))

    def trim(self, topic: str, *, committed: bool, max_age_s: float | None, max_messages: int | None) -> int:
        """Delete records by policy (``KafkaBroker.trim``); return how many went."""
        partitions = sorted(self.metadata(topic).partitions)
        lows, highs = self.extents(topic, partitions)
        keep = dict(lows)
        if committed:
            groups = self.group_offsets(topic, partitions)
            if groups:
                for p in partitions:
                    marks = [saved[p].commit if p in saved else None for saved in groups.values()]
                    keep[p] = max(keep[p], min(m if m is not None else 0 for m in marks))
        if max_messages is not None:
            keep = {p: max(keep[p], highs[p] - max_messages) for p in partitions}
        if max_age_s is not None:
            since = _for_timestamp(int((time.time() - max_age_s) * 1000))
            young = self.offsets(topic, partitions, since)
            keep = {p: max(keep[p], young[p] if young[p] >= 0 else highs[p]) for p in partitions}
        cut = [TopicPartition(topic, p, min(keep[p], highs[p])) for p in partitions if keep[p] > lows[p]]
        if not cut:
            return 0

        def ask(timeout: float) -> dict[int, int]:
            futures = self._client.delete_records(cut, request_timeout=timeout, operation_timeout=timeout)
            return {tp.partition: f.result(timeout).low_watermark for tp, f in futures.items()}

        new_lows = self.retry(f"deleting records of {topic!r}", ask)
        return sum(max(0, low - lows[p]) for p, low in new_lows.items())


def _for_timestamp(ms: int) -> Any:
    return OffsetSpec.for_timestamp(ms)
