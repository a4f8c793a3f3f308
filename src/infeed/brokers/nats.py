"""``nats://``: NATS JetStream.

* A topic is a stream (``infeed_<topic>``, escaped) with one subject per partition,
  ``infeed.<topic>.<p>``; a key picks the partition with ``partition_for_key``.
* ``Position.offset`` is the JetStream stream sequence. It is global to the stream, so the offsets
  of one partition grow but skip the other partitions' sequences (``PartitionInfo.high`` is the
  stream's next sequence, the same for every partition).
* A group is one durable pull consumer per partition (``<group>_P<p>``, explicit acks,
  ``AckWait = ack_timeout_s``, ``MaxDeliver = max_deliver``): members of a group pull from the same
  consumers, so each message goes to one member at a time; ``delivery_count`` is JetStream's
  delivered count. The pull and lease machinery is in ``_nats_pull.py`` and ``_nats_lanes.py``.
* ``commit`` stores resume positions in the KV bucket ``infeed-offsets``; it never acks.
* ``seek`` deletes and re-creates the partition's consumer at the sequence: it moves the whole
  group, and deliveries other members held before it are forgotten by the server.
* ``nack(requeue=False)`` stores a copy on the dead-letter topic, then terminates the message.
* Retention: stream limits from the URL (``retention_max_age_s``, ``retention_max_bytes``,
  ``retention_max_messages`` per partition) when a topic is created, and :meth:`NATSBroker.trim`.

nats-py is asyncio-only; the broker runs it on its own event loop thread (``_aio.LoopThread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors

from infeed.brokers._aio import LoopThread
from infeed.brokers._nats_admin import Topics
from infeed.brokers._nats_link import (
    ERR_STREAM_NOT_FOUND,
    Link,
    encode_headers,
    headers_size,
    redact,
    subject_of,
)
from infeed.brokers._nats_pull import Puller
from infeed.brokers._retry import backoff_total_s
from infeed.brokers._url import parse_options
from infeed.brokers.base import (
    Broker,
    BrokerConfig,
    Consumer,
    Message,
    StartFrom,
    as_deliveries,
    as_positions,
    check_headers,
    check_payload,
    check_topic_name,
    check_trim_limits,
    dead_letter_copy,
    default_dead_letter_topic,
    normalize_key,
    partition_for_key,
)
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    InfeedError,
    PayloadTooLargeError,
    TopicNotFoundError,
)
from infeed.types import Capability, Delivery, Position, TopicInfo

__all__ = [
    "DEFAULT_PUBLISH_WINDOW",
    "DEFAULT_RECONNECT_ATTEMPTS",
    "DEFAULT_RECONNECT_BACKOFF_MAX_S",
    "DEFAULT_RECONNECT_BACKOFF_S",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "NATSBroker",
    "NATSConfig",
]

T = TypeVar("T")

#: Seconds to wait for one answer of the server (an API call, a batch of publish acks).
DEFAULT_REQUEST_TIMEOUT_S = 5.0
#: Retries of an operation while the connection is down, before BrokerConnectionError.
DEFAULT_RECONNECT_ATTEMPTS = 10
#: First wait between two retries; it doubles on every retry.
DEFAULT_RECONNECT_BACKOFF_S = 0.1
#: Longest wait between two retries.
DEFAULT_RECONNECT_BACKOFF_MAX_S = 5.0
#: Publishes in flight (sent, not yet acked by JetStream) per ``publish_many``.
DEFAULT_PUBLISH_WINDOW = 4096

#: JetStream's "message size exceeds maximum allowed".
_ERR_MESSAGE_TOO_BIG = 10054
#: nats-py exceptions that mean the server cannot be reached (or not any more).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.SecureConnRequiredError,
    nats.errors.SecureConnWantedError,
    nats.errors.SecureConnFailedError,
    nats.errors.AuthorizationError,
    nats.errors.InvalidUserCredentialsError,
    nats.errors.NoRespondersError,
    nats.errors.ServerNotInPoolError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)


@dataclass(frozen=True, kw_only=True)
class NATSConfig(BrokerConfig):
    """Options of ``nats://host:port`` (the query string).

    Attributes:
        server: the server URL without the query (``nats://user:pass@host:4222``).
        request_timeout_s: seconds to wait for one answer of the server.
        reconnect_attempts: retries of an operation while the server is unreachable.
        reconnect_backoff_s: first wait between retries (doubling up to the max).
        reconnect_backoff_max_s: longest wait between retries.
        publish_window: publishes in flight awaiting their JetStream ack.
        max_deliver: JetStream MaxDeliver of new groups (-1: unlimited). A message delivered
            that many times is no longer delivered (and not dead-lettered).
        max_ack_pending: JetStream MaxAckPending of new groups (-1: unlimited).
        prefetch: after a ``receive`` that filled its batch, ask for the next batch at once,
            so it arrives while the caller works on this one (its lease runs from then).
        storage: where new topics keep messages: ``file`` or ``memory``.
        replicas: stream replicas of new topics (clustered servers).
        retention_max_age_s: new topics drop messages older than this.
        retention_max_bytes: new topics keep at most this many bytes.
        retention_max_messages: new topics keep at most this many messages per partition.
    """

    server: str
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS
    reconnect_backoff_s: float = DEFAULT_RECONNECT_BACKOFF_S
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_S
    publish_window: int = DEFAULT_PUBLISH_WINDOW
    max_deliver: int = -1
    max_ack_pending: int = -1
    prefetch: bool = True
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    retention_max_age_s: float | None = None
    retention_max_bytes: int | None = None
    retention_max_messages: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("request_timeout_s", "reconnect_backoff_s", "reconnect_backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reconnect_attempts < 0:
            raise ValueError(f"reconnect_attempts must be >= 0, got {self.reconnect_attempts}")
        if self.publish_window < 1:
            raise ValueError(f"publish_window must be >= 1, got {self.publish_window}")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError(f"max_deliver must be -1 (unlimited) or >= 1, got {self.max_deliver}")
        if self.max_ack_pending == 0 or self.max_ack_pending < -1:
            raise ValueError(f"max_ack_pending must be -1 (unlimited) or >= 1, got {self.max_ack_pending}")
        if self.storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        for name in ("retention_max_age_s", "retention_max_bytes", "retention_max_messages"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 when set, got {value}")


def _translate(exc: BaseException, url: str) -> InfeedError | None:
    """The infeed error for a nats-py (or socket) exception; None for anything else."""
    text = f"NATS at {url}: {_describe(exc)}"
    err_code = getattr(exc, "err_code", None)  # JetStream API errors; KV errors lack it
    if isinstance(exc, nats.errors.MaxPayloadError) or err_code == _ERR_MESSAGE_TOO_BIG:
        return PayloadTooLargeError(text)
    if isinstance(exc, nats.js.errors.NotFoundError) and err_code == ERR_STREAM_NOT_FOUND:
        return TopicNotFoundError(text)
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is one too
        return BrokerTimeoutError(text)
    if isinstance(exc, _CONNECTION_ERRORS):
        return BrokerConnectionError(text)
    if isinstance(exc, nats.errors.Error):
        return BrokerError(text)
    return None


def _describe(exc: BaseException) -> str:
    # Some nats-py exceptions format fields that may be unset (ConsumerSequenceMismatchError),
    # and APIError keeps its text out of ``args``: str() is the useful form, but may fail.
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _map_errors(url: str) -> Iterator[None]:
    """Translate nats-py's exceptions into the infeed error tree (``raise ... from``)."""
    try:
        yield
    except InfeedError:
        raise
    except Exception as exc:
        mapped = _translate(exc, url)
        if mapped is None:
            raise
        raise mapped from exc


class NATSBroker(Broker):
    """NATS JetStream broker (``nats://host:port``)."""

    scheme = "nats"
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

    def __init__(self, config: NATSConfig) -> None:
        """Connect to ``config.server``.

        Raises:
            BrokerConnectionError: naming the URL, if the server cannot be reached.
        """
        super().__init__(config)
        self._cfg = config
        self._url = redact(config.server)
        backoffs = backoff_total_s(
            config.reconnect_attempts, config.reconnect_backoff_s, config.reconnect_backoff_max_s
        )
        #: a safety net over every call; operations bound themselves well within it
        self._call_limit_s = (config.reconnect_attempts + 2) * (config.request_timeout_s + 1) + backoffs
        self._aio = LoopThread("infeed-nats")
        self._round_robin = itertools.count()
        self._pullers: set[Puller] = set()
        self._closed = False
        try:
            self._link = self._aio.run(self._open(), self._call_limit_s)
        except BaseException as exc:
            self._aio.close()
            if isinstance(exc, nats.errors.Error | OSError | TimeoutError):
                raise BrokerConnectionError(f"cannot connect to NATS at {self._url}: {exc!r}") from exc
            raise
        self._server_max = self._link.nc.max_payload
        self._topics = Topics(self._link, config)

    async def _open(self) -> Link:
        link = Link(self._cfg)
        await link.open()
        return link

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Connect from ``nats://[user:pass@]host[:port][?options]`` (options: :class:`NATSConfig`)."""
        parts = urlsplit(url)
        if parts.scheme != "nats" or not parts.hostname:
            raise ConfigError(f"not a NATS URL (nats://host:port): {url!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"NATS URL {url!r} takes no path or fragment")
        server = urlunsplit(("nats", parts.netloc, "", "", ""))
        return cls(parse_options(parts.query, NATSConfig, server=server))

    @property
    def max_payload_bytes(self) -> int:
        """Largest payload: the configured limit or the server's ``max_payload`` (headers count too)."""
        return min(self.config.max_payload_bytes, self._server_max)

    def _run(self, coro: Coroutine[Any, Any, T], extra_s: float = 0.0) -> T:
        if self._closed:
            coro.close()
            raise BrokerError(f"the NATS broker object for {self._url} is closed")
        with _map_errors(self._url):
            return self._aio.run(coro, self._call_limit_s + extra_s)

    # -- topics -------------------------------------------------------------------------------

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic (a stream with ``partitions`` subjects); a no-op if it exists alike.

        Raises:
            BrokerError: if it exists with another partition count.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        n = self._run(self._topics.partition_count(topic, create=True, partitions=partitions))
        if n != partitions:
            raise BrokerError(f"topic {topic!r} exists with {n} partitions, not {partitions}")

    def delete_topic(self, topic: str) -> None:
        """Delete a topic's stream, its groups (consumers) and their committed offsets."""
        self._run(self._topics.delete(topic))

    def list_topics(self) -> list[str]:
        """Return the topics (infeed's streams), sorted."""
        return self._run(self._topics.names())

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions (from the stream state) and groups (consumers plus committed offsets)."""
        return self._run(self._topics.describe(topic))

    def trim(
        self,
        topic: str,
        *,
        committed: bool = True,
        max_age_s: float | None = None,
        max_messages: int | None = None,
    ) -> int:
        """Drop old messages of every partition; what is dropped is gone for every group.

        Args:
            topic: the topic.
            committed: drop what every group has committed past (a group that never committed
                keeps everything).
            max_age_s: drop messages published more than this many seconds ago.
            max_messages: keep only the newest this many messages per partition.

        Returns:
            how many messages were dropped.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)
        return self._run(self._topics.trim(topic, committed, max_age_s, max_messages))

    # -- publish ------------------------------------------------------------------------------

    def _prepare(
        self, messages: Iterable[Message | bytes]
    ) -> list[tuple[bytes, bytes | None, dict[str, str] | None, int | None]]:
        """Check every message before anything is sent (all-or-nothing on size)."""
        limit = self.max_payload_bytes
        prepared = []
        for m in messages:
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            payload = check_payload(msg.payload, limit)
            key = normalize_key(msg.key)
            headers = encode_headers(key, check_headers(msg.headers))
            extra = headers_size(headers)
            if len(payload) + extra > self._server_max:
                raise PayloadTooLargeError(
                    f"payload of {len(payload)} bytes plus {extra} bytes of headers (key included) is "
                    f"over the NATS server's max_payload of {self._server_max} bytes; nothing was written"
                )
            prepared.append((payload, key, headers, msg.partition))
        return prepared

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Publish in order, pipelined; returns once JetStream acked every message."""
        check_topic_name(topic)
        prepared = self._prepare(messages)
        if prepared:
            self._run(self._publish(topic, prepared))
        else:  # like every backend: publishing creates the topic, even with nothing to publish
            self._run(self._topics.partition_count(topic, create=True))

    async def _publish(
        self, topic: str, prepared: list[tuple[bytes, bytes | None, dict[str, str] | None, int | None]]
    ) -> None:
        n = await self._topics.partition_count(topic, create=True)
        items = []
        for payload, key, headers, partition in prepared:
            if partition is not None:
                if not 0 <= partition < n:
                    raise ValueError(f"partition {partition} out of range 0..{n - 1} of {topic!r}")
                p = partition
            elif key is not None:
                p = partition_for_key(key, n)
            else:
                p = next(self._round_robin) % n
            items.append((subject_of(topic, p), payload, headers))

        async def recreate(subjects: list[str]) -> None:
            self._topics.forget(topic)
            if await self._topics.partition_count(topic, create=True) != n:
                raise BrokerError(f"topic {topic!r} changed its partition count during a publish")

        await self._link.publish(items, recreate)

    async def _dead_letter(self, topic: str, deliveries: list[Delivery], reason: str) -> None:
        msgs = [dead_letter_copy(d, reason) for d in deliveries]
        await self._publish(topic, self._prepare(msgs))

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
        """Join ``group`` on ``topic`` (creating the topic and the group's consumers if missing)."""
        check_topic_name(topic)
        if not isinstance(group, str) or not group:
            raise ValueError(f"group must be a non-empty string, got {group!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        dlq = dead_letter_topic or default_dead_letter_topic(topic)
        check_topic_name(dlq)
        puller = self._run(self._subscribe(topic, group, start, partitions, dlq))
        return _NATSConsumer(self, puller, dlq)

    async def _subscribe(
        self, topic: str, group: str, start: str, partitions: Sequence[int] | None, dlq: str
    ) -> Puller:
        n = await self._topics.partition_count(topic, create=True)
        chosen = list(range(n)) if partitions is None else list(partitions)
        for p in chosen:
            if not 0 <= p < n:
                raise ValueError(f"partition {p} out of range 0..{n - 1} of {topic!r}")
        if not chosen:
            raise ValueError("partitions must name at least one partition")

        async def dead_letter(deliveries: list[Delivery], reason: str) -> None:
            await self._dead_letter(dlq, deliveries, reason)

        puller = Puller(self._link, topic, group, sorted(set(chosen)), dead_letter)
        await puller.open(start)
        self._pullers.add(puller)
        return puller

    # -- close --------------------------------------------------------------------------------

    def close(self) -> None:
        """Give back what open consumers hold, close the connection and the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            with contextlib.suppress(InfeedError, RuntimeError, TimeoutError):
                self._run(self._close(), extra_s=0.0)
        finally:
            self._closed = True
            self._aio.close()

    async def _release(self, puller: Puller) -> None:
        self._pullers.discard(puller)
        await puller.close()

    async def _close(self) -> None:
        for puller in list(self._pullers):
            with contextlib.suppress(InfeedError, nats.errors.Error, TimeoutError):
                await asyncio.wait_for(puller.close(), self._cfg.request_timeout_s)
        self._pullers.clear()
        await self._link.close()

    def __repr__(self) -> str:
        return f"<NATSBroker {self._url}>"


class _NATSConsumer(Consumer):
    def __init__(self, broker: NATSBroker, puller: Puller, dead_letter_topic: str) -> None:
        super().__init__(broker, puller.topic, puller.group, dead_letter_topic)
        self._b = broker
        self._p = puller

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        return self._b._run(self._p.receive(max_messages, timeout_s), extra_s=max(0.0, timeout_s))

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        if self._b._closed:
            raise BrokerError(f"the NATS broker object for {self._b._url} is closed")
        self._b._run(self._p.ack(as_deliveries(deliveries)))

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        self._b._run(self._p.settle(as_deliveries(deliveries), requeue, reason))

    def commit(self, positions: Position | Iterable[Position]) -> None:
        self._p.check_open()
        self._b._run(self._b._topics.commit(self.topic, self.group, as_positions(positions)))

    def committed(self) -> dict[int, Position]:
        self._p.check_open()
        return self._b._run(self._b._topics.committed(self.topic, self.group))

    def seek(self, positions: Position | Iterable[Position]) -> None:
        self._p.check_open()
        self._b._run(self._seek(as_positions(positions)))

    async def _seek(self, positions: list[Position]) -> None:
        await self._b._topics.check_positions(self.topic, positions)
        for pos in positions:
            await self._p.seek(pos.partition, pos.offset)

    def close(self) -> None:
        if self._p.closed:
            return
        if self._b._closed:
            self._p.closed = True
            return
        try:
            self._b._run(self._b._release(self._p))
        finally:
            self._p.closed = True
