"""``amqp://``: RabbitMQ over AMQP 0-9-1 (pika), queue model and stream model.

``amqp://USER:PASSWORD@HOST:PORT/VHOST?queue_type=classic|quorum|stream&...``

Queue model (``classic``, the default, or ``quorum``): a topic is a durable direct exchange
``TOPIC``; partition ``p`` of group ``G`` is the durable queue ``TOPIC:p:G`` bound to it with the
routing key ``p`` (``:`` cannot occur in a topic, so no two (topic, group) pairs share a queue).
Every group gets every message published after its queues exist; members of one group compete
for messages with manual acks. A position's offset is a publish stamp (wall-clock nanoseconds,
made strictly increasing per producer, with a per-producer tag in the last three digits): it
orders one producer's messages and identifies a message across redeliveries, but the broker keeps
no extent, so there is no replay, seek or commit.

Stream model (``stream``): see ``_rabbitmq_stream``.

Topics and groups are recorded in a registry stream (``_rabbitmq_registry``) because AMQP cannot
list them. Every operation runs on one I/O thread per broker (``_rabbitmq_io``); a dropped
connection is reopened with bounded exponential backoff, and what a SIGKILLed node needs from
its clients to come back whole is in ``_rabbitmq_recovery``.
"""

from __future__ import annotations

import functools
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Self, TypeVar
from urllib.parse import quote, unquote, urlsplit

import pika
import pika.exceptions

from infeed.brokers import _rabbitmq_io as io
from infeed.brokers import _rabbitmq_recovery as recovery
from infeed.brokers import _rabbitmq_wire as wire
from infeed.brokers._rabbitmq_io import Chan, Item, Loop
from infeed.brokers._rabbitmq_io import is_connection_loss as _is_connection_loss
from infeed.brokers._rabbitmq_registry import REGISTRY_QUEUE, Registry, TopicMeta
from infeed.brokers._rabbitmq_topology import DEAD_LETTER_GROUP as DEAD_LETTER_GROUP
from infeed.brokers._rabbitmq_topology import Topology
from infeed.brokers._rabbitmq_topology import queue_name as queue_name
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
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
)
from infeed.types import Capability, TopicInfo

if TYPE_CHECKING:
    from infeed.brokers._rabbitmq_stream import StreamGroup

__all__ = ["RabbitMQBroker", "RabbitMQConfig"]

T = TypeVar("T")

#: Unconfirmed messages a publisher keeps in flight.
DEFAULT_PUBLISH_WINDOW = 2000
#: Connection attempts after a drop before ``BrokerConnectionError``.
DEFAULT_RECONNECT_ATTEMPTS = 10
#: First pause between connection attempts; doubles each time up to ``reconnect_backoff_max_s``.
DEFAULT_RECONNECT_BACKOFF_S = 0.25
#: Longest pause between connection attempts.
DEFAULT_RECONNECT_BACKOFF_MAX_S = 5.0
#: How long one broker round trip (or a batch of confirms) may take.
DEFAULT_TIMEOUT_S = 30.0
#: A receive that got fewer messages than the queue held returns after this long without news.
DEFAULT_LINGER_S = 0.002
#: A consumer whose caller has not received for this long stops taking messages.
DEFAULT_IDLE_S = 0.25
#: Stream model: how long a process keeps a group before handing it to a waiting process.
DEFAULT_HOLD_S = 2.0
#: AMQP heartbeat interval (seconds; 0 disables).
DEFAULT_HEARTBEAT_S = 30


_QUEUE_CAPS = frozenset(
    {
        Capability.PER_MESSAGE_ACK,
        Capability.PARTITIONS,
        Capability.DEAD_LETTER,
        Capability.REDELIVERY,
        Capability.CRASH_DELIVERY_COUNT,
        Capability.MULTI_PROCESS,
    }
)


@dataclass(frozen=True, kw_only=True)
class RabbitMQConfig(BrokerConfig):
    """Options of ``amqp://`` (host, port, vhost and credentials come from the URL itself).

    Attributes:
        queue_type: ``classic`` or ``quorum`` (queue model) or ``stream`` (log model).
        max_priority: queue model: ``x-max-priority`` of new group queues (0: no priorities).
        publish_window: unconfirmed messages kept in flight by a publisher.
        reconnect_attempts: connection attempts after a drop before giving up.
        reconnect_backoff_s: first pause between attempts (doubles each time).
        reconnect_backoff_max_s: longest pause between attempts.
        timeout_s: longest wait for one broker round trip.
        linger_s: how long a receive waits for more once messages stopped coming.
        idle_s: a consumer not asked for messages for this long stops taking them (queue model).
        hold_s: how long a process keeps a group before handing it to a waiting one (stream model).
        heartbeat_s: AMQP heartbeat interval.
    """

    host: str = "127.0.0.1"
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    queue_type: Literal["classic", "quorum", "stream"] = "classic"
    max_priority: int = 0
    publish_window: int = DEFAULT_PUBLISH_WINDOW
    reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS
    reconnect_backoff_s: float = DEFAULT_RECONNECT_BACKOFF_S
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    linger_s: float = DEFAULT_LINGER_S
    idle_s: float = DEFAULT_IDLE_S
    hold_s: float = DEFAULT_HOLD_S
    heartbeat_s: int = DEFAULT_HEARTBEAT_S

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.max_priority <= 255:
            raise ValueError(f"max_priority must be in 0..255, got {self.max_priority}")
        if self.max_priority and self.queue_type == "stream":
            raise ValueError("max_priority needs queue_type=classic or quorum; streams have no priorities")
        for name in ("publish_window", "reconnect_attempts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "reconnect_backoff_s",
            "reconnect_backoff_max_s",
            "timeout_s",
            "linger_s",
            "idle_s",
            "hold_s",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def url(self) -> str:
        """The broker URL without the password (for messages)."""
        return f"amqp://{self.username}@{self.host}:{self.port}/{quote(self.vhost, safe='')}"


#: The one place pika's exceptions become infeed's (defined next to the I/O thread that raises them).
_map_errors = io.map_errors


class RabbitMQBroker(Broker):
    """RabbitMQ (``amqp://``): queue model (classic or quorum queues) or stream model."""

    scheme = "amqp"
    #: The classic-queue default; an instance's own set depends on ``queue_type`` and ``max_priority``.
    capabilities = _QUEUE_CAPS

    def __init__(self, config: RabbitMQConfig | None = None) -> None:
        super().__init__(config or RabbitMQConfig())
        self.config: RabbitMQConfig
        cfg = self.config
        self.model = "stream" if cfg.queue_type == "stream" else "queue"
        if self.model == "stream":
            from infeed.brokers._rabbitmq_stream import STREAM_CAPS

            caps = STREAM_CAPS
        else:
            caps = _QUEUE_CAPS | ({Capability.PRIORITY} if cfg.max_priority else set())
        vars(self)["capabilities"] = frozenset(caps)  # per instance: it depends on the URL
        self._params = pika.ConnectionParameters(
            host=cfg.host,
            port=cfg.port,
            virtual_host=cfg.vhost,
            credentials=pika.PlainCredentials(cfg.username, cfg.password),
            heartbeat=cfg.heartbeat_s,
            connection_attempts=1,
            socket_timeout=cfg.timeout_s,
            stack_timeout=cfg.timeout_s,
            blocked_connection_timeout=cfg.timeout_s,
            client_properties={"connection_name": "infeed"},
        )
        self._loop: Loop | None = None
        self._loop_lock = threading.Lock()
        self._closed = threading.Event()
        self._registry = Registry(self._live, self._publish_items)
        self._topology = Topology(self)
        self._stamp_lock = threading.Lock()
        self._stamp_tag = random.randrange(1000)
        self._last_stamp = 0
        self._round_robin = itertools.count()
        self._stream_lock = threading.Lock()
        self._stream_groups: dict[tuple[str, str], StreamGroup] = {}
        with _map_errors(cfg.url):
            self._live()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Connect from ``amqp://[USER[:PASSWORD]@]HOST[:PORT][/VHOST][?options]``.

        Raises:
            ConfigError: for a malformed URL or an unknown option.
            BrokerConnectionError: if RabbitMQ cannot be reached.
        """
        parts = urlsplit(url)
        if parts.scheme != "amqp" or not parts.hostname:
            raise ConfigError(f"expected amqp://USER:PASSWORD@HOST:PORT/VHOST, got {url!r}")
        try:
            port = parts.port or 5672
        except ValueError as exc:
            raise ConfigError(f"bad port in {url!r}") from exc
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            parse_options(
                parts.query,
                RabbitMQConfig,
                host=parts.hostname,
                port=port,
                vhost=unquote(path) if path else "/",
                username=unquote(parts.username) if parts.username else "guest",
                password=unquote(parts.password) if parts.password else "guest",
            )
        )

    # -- connection -------------------------------------------------------------------------

    def _live(self) -> Loop:
        """Return the open connection, reconnecting with bounded exponential backoff."""
        with self._loop_lock:
            if self._closed.is_set():
                raise BrokerError(f"broker {self.config.url} is closed")
            loop = self._loop
            if loop is not None and not loop.closed:
                return loop
            self._loop = None
            if loop is not None:
                loop.close()
            cfg = self.config
            delay, last = cfg.reconnect_backoff_s, None
            for attempt in range(cfg.reconnect_attempts):
                try:
                    self._loop = Loop(self._params, timeout_s=cfg.timeout_s, window=cfg.publish_window)
                    return self._loop
                except (pika.exceptions.AMQPError, OSError, BrokerTimeoutError) as exc:
                    last = exc
                if attempt + 1 < cfg.reconnect_attempts and self._closed.wait(delay):
                    break
                delay = min(delay * 2, cfg.reconnect_backoff_max_s)
            raise BrokerConnectionError(
                f"cannot reach RabbitMQ at {cfg.url} after {cfg.reconnect_attempts} attempts: "
                f"{io.describe(last) if last else 'closed while waiting'}"
            ) from last

    def _retry(self, what: str, fn: Callable[[Loop], T]) -> T:
        """Run ``fn`` on the live connection; after a connection loss, reconnect and run it again."""
        return io.retry_on_loss(
            self.config.reconnect_attempts,
            self._live,
            lambda loop: self._when_ready(what, functools.partial(fn, loop)),
            lambda loop: loop,
            lambda failures, _exc: BrokerConnectionError(
                f"{what}: the connection to {self.config.url} kept dropping ({failures} times)"
            ),
        )

    def _when_ready(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``; while a restarted node has not started a stream yet, back off and call it again.

        Raises:
            BrokerConnectionError: the stream was still not running after ``reconnect_attempts`` calls.
        """
        cfg = self.config
        delay = cfg.reconnect_backoff_s
        for attempt in range(1, cfg.reconnect_attempts + 1):
            try:
                return fn()
            except pika.exceptions.ChannelClosedByBroker as exc:
                if not recovery.is_stream_recovering(exc):
                    raise
                if attempt == cfg.reconnect_attempts:
                    raise BrokerConnectionError(
                        f"{what}: RabbitMQ at {cfg.url} still answers {exc.reply_code} "
                        f"{exc.reply_text!r} after {attempt} tries. A restarted node starts its streams "
                        "shortly after it accepts connections: retry later or raise reconnect_attempts. "
                        "If it never ends, the node lost its stream coordinator (RabbitMQ 3.10 does when "
                        "killed within ~3 s of its first stream; see docs/architecture.md)"
                    ) from exc
            if self._closed.wait(delay):
                break
            delay = min(delay * 2, cfg.reconnect_backoff_max_s)
        raise BrokerError(f"broker {cfg.url} is closed")

    def _sync(self) -> dict[str, TopicMeta]:
        return self._retry("reading the topic registry", lambda _loop: self._registry.sync())

    def _admin(self, what: str, fn: Callable[[Chan], T]) -> T:
        """Run ``fn`` on a short-lived channel (broker errors close a channel, so never share one)."""

        def run(loop: Loop) -> T:
            chan = loop.channel()
            try:
                return fn(chan)
            finally:
                chan.close()

        return self._retry(what, run)

    # -- topics -----------------------------------------------------------------------------

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` partitions (queue model: one queue per group each).

        Raises:
            BrokerError: if it exists with another partition count or in the other model.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        if self.model == "stream" and partitions != 1:
            raise BrokerError("the stream model has one partition per topic; use queue_type=classic for more")
        with _map_errors(self.config.url):
            meta = self._topology.meta(topic, create=True, partitions=partitions)
            if meta.partitions != partitions:
                raise BrokerError(
                    f"topic {topic!r} exists with {meta.partitions} partitions, not {partitions}"
                )

    def delete_topic(self, topic: str) -> None:
        """Delete the topic's exchange (or stream), its group queues and its registry entry.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        with _map_errors(self.config.url):
            self._topology.delete(topic)

    def list_topics(self) -> list[str]:
        """Return the names of this model's topics, sorted."""
        with _map_errors(self.config.url):
            return self._topology.names()

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions and groups; queue model: ``lag`` is each group queue's ready count.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        with _map_errors(self.config.url):
            return self._topology.describe(topic)

    # -- publish ----------------------------------------------------------------------------

    def _stamp(self) -> int:
        with self._stamp_lock:
            stamp = time.time_ns() // 1000 * 1000 + self._stamp_tag
            if stamp <= self._last_stamp:
                stamp = self._last_stamp + 1000
            self._last_stamp = stamp
            return stamp

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Publish in order with publisher confirms; returns once RabbitMQ holds them all.

        A message that was sent but whose confirm was lost to a dropped connection is sent again
        (at-least-once). In the queue model a topic with no group yet keeps nothing.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing of the call is written.
            BrokerError: the broker failed (some messages may have been written).
        """
        check_topic_name(topic)
        limit = self.config.max_payload_bytes
        prepared = []
        for m in messages:
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            prepared.append(
                (
                    check_payload(msg.payload, limit),
                    normalize_key(msg.key),
                    check_headers(msg.headers),
                    msg.partition,
                )
            )
        if not prepared:
            return
        with _map_errors(self.config.url):
            meta = self._topology.meta(topic, create=True)
            n = meta.partitions
            items: list[Item] = []
            for payload, key, headers, partition in prepared:
                if partition is not None:
                    if not 0 <= partition < n:
                        raise ValueError(f"partition {partition} out of range 0..{n - 1} of {topic!r}")
                    p = partition
                elif key is not None:
                    p = partition_for_key(key, n)
                else:
                    p = next(self._round_robin) % n
                props = wire.properties(
                    self._stamp(), key, headers, wire.priority(headers, meta.max_priority)
                )
                if meta.model == "stream":
                    items.append(("", topic, payload, props))
                else:
                    items.append((topic, str(p), payload, props))
            self._publish_items(items, topic=topic)

    def _publish_items(self, items: Sequence[Item], *, topic: str | None = None) -> None:
        """Publish with confirms, resending what was not confirmed after a connection loss."""
        remaining: Sequence[Item] = items
        failures, redeclared = 0, False
        exc: BaseException | None
        while remaining:
            loop = self._live()
            try:
                self._check_streams(loop, remaining)
            except Exception as error:
                exc = error
            else:
                job, exc = io.publish(loop, remaining)
                if exc is None:
                    return
                remaining = job.unconfirmed()
            if (
                isinstance(exc, pika.exceptions.ChannelClosedByBroker)
                and exc.reply_code == 404
                and topic
                and not redeclared
            ):
                # the topic was deleted since we cached it: publishing re-creates it, like a first publish
                redeclared = True
                self._topology.forget(topic)
                self._topology.meta(topic, create=True)
                continue
            if not _is_connection_loss(exc, loop):
                raise exc
            failures += 1
            if failures >= self.config.reconnect_attempts:
                raise BrokerConnectionError(
                    f"publishing to {self.config.url}: the connection kept dropping ({failures} times)"
                ) from exc

    def _check_streams(self, loop: Loop, items: Sequence[Item]) -> None:
        """Before the first publish to a stream on ``loop``: wait until the node runs that stream.

        A restarted node confirms and drops what is published to a stream it has not restarted
        yet (``_rabbitmq_recovery``).
        """
        for name in {key for exchange, key, _, _ in items if not exchange and self._is_stream(key)}:
            if name in loop.ready_streams:
                continue

            def check(name: str = name) -> None:
                chan = loop.channel()
                try:
                    recovery.check_stream(chan, name)
                finally:
                    chan.close()

            self._when_ready(f"publishing to stream {name!r}", check)
            loop.ready_streams.add(name)

    def _is_stream(self, queue: str) -> bool:
        """Whether ``queue`` (a routing key on the default exchange) names a stream."""
        return queue == REGISTRY_QUEUE or (self.model == "stream" and ":" not in queue)

    # -- consume ----------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartFrom = "earliest",
        partitions: Sequence[int] | None = None,
        dead_letter_topic: str | None = None,
    ) -> Consumer:
        """Join ``group`` on ``topic``, creating the topic and the group's queues if missing.

        In the queue model a new group sees the messages published after this call whatever
        ``start`` says (no ``Capability.REPLAY``).
        """
        check_topic_name(topic)
        if not isinstance(group, str) or not group:
            raise ValueError("group must be a non-empty string")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if dead_letter_topic is not None:
            check_topic_name(dead_letter_topic)
        with _map_errors(self.config.url):
            meta = self._topology.meta(topic, create=True)
            chosen = list(range(meta.partitions)) if partitions is None else list(partitions)
            for p in chosen:
                if not 0 <= p < meta.partitions:
                    raise ValueError(f"partition {p} out of range 0..{meta.partitions - 1} of {topic!r}")
            if self.model == "stream":
                from infeed.brokers import _rabbitmq_stream

                return _rabbitmq_stream.subscribe(self, topic, meta, group, start, dead_letter_topic)
            from infeed.brokers._rabbitmq_queue import QueueConsumer

            names = self._topology.declare_group(topic, meta, group)
            return QueueConsumer(self, topic, group, meta, [(p, names[p]) for p in chosen], dead_letter_topic)

    def close(self) -> None:
        """Close the connection (consumers' unacked deliveries go back to their queues). Idempotent."""
        self._closed.set()
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {self.config.url} queue_type={self.config.queue_type}>"
