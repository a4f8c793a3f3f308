"""``redis://``: a log broker on Redis Streams (Redis 7.0 or later, standalone).

How the contract maps onto the engine (key layout and entry fields: ``_redis_wire.py``):

* A topic with N partitions is N streams plus its partition count in the ``topics`` hash.
  Keys hash with ``partition_for_key``; keyless messages go round-robin.
* ``Position.offset`` is the stream id packed as ``ms << 64 | seq``. infeed appends with ids
  ``0-1, 0-2, ...``, so offsets are dense sequence numbers: lag = high - committed, exactly.
* A consumer group is a Redis consumer group on every partition stream (``0`` for
  ``start="earliest"``, ``$`` for ``"latest"``); each consumer object is a uniquely named member.
* ``receive`` claims entries idle for ``ack_timeout_s`` or given back (a Lua script: XPENDING
  IDLE + XCLAIM, which counts the redelivery) and reads new ones (XREADGROUP ``>``) in one
  round trip; when there is nothing it blocks in XREADGROUP for at most ``poll_s`` at a time.
  After a full batch, ``ack`` fetches the next one in its own round trip (read-ahead, see
  ``_redis_consumer.py``): one round trip and one server write per batch.
* ``receive_acked`` reads new entries with XREADGROUP NOACK: they never enter the pending list,
  so no settle script runs and the server writes no per-entry claim (about a sixth of the
  server's CPU of ``receive`` + ``ack``). Claimed redeliveries are acked before they are returned.
* ``ack``/``nack`` check in Lua that each entry is still pending for the consumer that leased
  it with the same delivery count (XACK alone is group-wide), else ``LeaseLostError``.
  ``nack(requeue=True)`` passes the entry to a holder member, idle since 1970, so the next
  receive of any member claims it (``close`` does the same with every lease it holds);
  ``nack(requeue=False)`` appends to the dead-letter topic and acks in one script.
* ``commit`` stores resume ids in a hash per topic (it never acks); ``seek`` moves the group
  (XGROUP SETID) and drops pending entries at or after the position.
* Publishing is one Lua call per batch: a batch is all or nothing. Retries after a lost
  connection may write a batch twice (at-least-once); durability is the server's
  ``appendfsync`` setting.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar, cast
from urllib.parse import unquote, urlsplit

import hiredis
import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from infeed.brokers import _redis_wire as wire
from infeed.brokers._redis_consumer import _RedisConsumer
from infeed.brokers._retry import backoff_s
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
    partition_for_key,
)
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    TopicNotFoundError,
)
from infeed.types import Capability, GroupInfo, PartitionInfo, TopicInfo

__all__ = ["RedisBroker", "RedisConfig"]

#: Key prefix of everything infeed stores in Redis.
DEFAULT_PREFIX = "infeed"
#: Reconnect attempts of one operation before it raises BrokerConnectionError.
DEFAULT_RECONNECT_ATTEMPTS = 10
#: Wait before the first reconnect attempt; doubled after each failed one.
DEFAULT_RECONNECT_BACKOFF_S = 0.1
#: Longest wait between two reconnect attempts.
DEFAULT_RECONNECT_BACKOFF_MAX_S = 5.0
#: Longest wait for one reply of the server.
DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: Longest wait to open a connection.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Longest a waiting ``receive`` blocks before it looks again for expired or given-back entries.
DEFAULT_POLL_S = 0.5
#: Messages per publish script call (each call is atomic and blocks the server while it runs).
PUBLISH_BATCH = 1000
#: Payload bytes per publish script call.
PUBLISH_BATCH_BYTES = 4 * 1024 * 1024

_RETRYABLE = (rx.ConnectionError, rx.TimeoutError)
_NOT_RETRYABLE = (rx.AuthenticationError, rx.AuthorizationError, rx.AuthenticationWrongNumberOfArgsError)
_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RedisConfig(BrokerConfig):
    """Options of ``redis://[user:password@]host[:port][/db][?options]``.

    Attributes:
        host: server host (from the URL).
        port: server port (from the URL).
        db: database number (from the URL path).
        username: ACL user (from the URL).
        password: password (from the URL; never printed).
        prefix: prefix of every key infeed writes.
        socket_timeout_s: longest wait for one reply.
        connect_timeout_s: longest wait to connect.
        reconnect_attempts: reconnect attempts of one operation before it fails.
        reconnect_backoff_s: wait before the first reconnect attempt, doubled after each.
        reconnect_backoff_max_s: longest wait between reconnect attempts.
        poll_s: longest a waiting receive blocks before it looks for expired entries again.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS
    reconnect_backoff_s: float = DEFAULT_RECONNECT_BACKOFF_S
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_S
    poll_s: float = DEFAULT_POLL_S

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("socket_timeout_s", "connect_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.poll_s >= self.socket_timeout_s:
            raise ValueError(
                f"poll_s ({self.poll_s}) must be below socket_timeout_s ({self.socket_timeout_s})"
            )
        if self.reconnect_attempts < 0:
            raise ValueError(f"reconnect_attempts must be >= 0, got {self.reconnect_attempts}")
        if self.reconnect_backoff_s < 0 or self.reconnect_backoff_max_s < 0:
            raise ValueError("reconnect_backoff_s and reconnect_backoff_max_s must be >= 0")
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ValueError(f"prefix must be non-empty without braces or spaces, got {self.prefix!r}")
        if not 0 <= self.port < 65536 or self.db < 0:
            raise ValueError(f"bad port {self.port} or db {self.db}")

    @property
    def url(self) -> str:
        """The server's URL without credentials or options (for messages)."""
        return f"redis://{self.host}:{self.port}/{self.db}"


@contextlib.contextmanager
def _map_errors(where: str = "redis") -> Iterator[None]:
    """Translate redis-py (and hiredis) exceptions into the infeed error tree."""
    try:
        yield
    except rx.TimeoutError as exc:
        raise BrokerTimeoutError(f"{where} did not answer in time: {exc}") from exc
    except (rx.AuthenticationError, rx.AuthorizationError) as exc:
        raise BrokerConnectionError(f"{where} refused the credentials: {exc}; check the URL") from exc
    except rx.ConnectionError as exc:
        raise BrokerConnectionError(f"cannot reach {where}: {exc}") from exc
    except rx.ResponseError as exc:
        text = str(exc)
        if text.startswith("NOGROUP") or "caused error: NOGROUP" in text:  # alone, or in a pipeline
            raise TopicNotFoundError(f"{where}: topic or group was deleted ({exc})") from exc
        raise BrokerError(f"{where} failed a command: {exc}") from exc
    except (rx.RedisError, rx.RedisClusterException, hiredis.HiredisError) as exc:
        raise BrokerError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except (rx.ChildDeadlockedError, rx.IncorrectPolicyType) as exc:
        raise BrokerError(f"{where}: redis client misused: {exc}") from exc


def _raw(response: Any, **_: Any) -> Any:
    return response


class RedisBroker(Broker):
    """Log broker on Redis Streams (``redis://``).

    Args:
        config: connection and behaviour options; ``from_url`` builds them from a URL.

    Raises:
        BrokerConnectionError: if the server cannot be reached (after the reconnect attempts).
        ConfigError: if the server is older than Redis 7.0.
    """

    scheme = "redis"
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
    config: RedisConfig

    def __init__(self, config: RedisConfig | None = None) -> None:
        super().__init__(config or RedisConfig())
        cfg = self.config
        self._keys = wire.Keys(cfg.prefix)
        self._scripts = wire.load_scripts()
        self._counts: dict[str, int] = {}
        self._round_robin = itertools.count()
        self._consumers: weakref.WeakSet[_RedisConsumer] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._r = redis.Redis(
            host=cfg.host,
            port=cfg.port,
            db=cfg.db,
            username=cfg.username,
            password=cfg.password,
            socket_timeout=cfg.socket_timeout_s,
            socket_connect_timeout=cfg.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),  # infeed retries itself, knowing what is safe to repeat
            protocol=2,
        )
        # Entries are parsed once, by this module, from the raw reply (no dict per entry).
        self._r.set_response_callback("XREADGROUP", _raw)
        try:
            info = self._call(lambda _: self._r.info("server"))
        except BaseException:
            self._r.close()
            raise
        version = tuple(int(x) for x in str(info.get("redis_version", "0.0")).split(".")[:2])
        if version < (7, 0):
            self._r.close()
            raise ConfigError(f"{cfg.url} runs Redis {info.get('redis_version')}; infeed needs 7.0 or later")

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Connect from ``redis://[user:password@]host[:port][/db][?options]``.

        Options are the fields of :class:`RedisConfig` after ``prefix`` (and the common ones,
        e.g. ``ack_timeout_s``).

        Raises:
            ConfigError: for a malformed URL or an unknown option.
            BrokerConnectionError: if the server cannot be reached.
        """
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ConfigError(f"not a redis:// URL: {url!r}")
        try:
            port = parts.port or 6379
            path = parts.path.strip("/")
            db = int(path) if path else 0
        except ValueError as exc:
            raise ConfigError(f"bad port or database number in {url!r}: {exc}") from exc
        fixed: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": port,
            "db": db,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        return cls(parse_options(parts.query, RedisConfig, **fixed))

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, op: Callable[[bool], T]) -> T:
        """Run ``op(retried)``, reconnecting with exponential backoff on connection errors."""
        cfg = self.config
        attempt = 0
        start = time.monotonic()
        with _map_errors(cfg.url):
            while True:
                if self._closed:
                    raise BrokerError(f"the broker for {cfg.url} is closed")
                try:
                    return op(attempt > 0)
                except _NOT_RETRYABLE:
                    raise
                except _RETRYABLE as exc:
                    if attempt >= cfg.reconnect_attempts:
                        kind = (
                            BrokerTimeoutError if isinstance(exc, rx.TimeoutError) else BrokerConnectionError
                        )
                        raise kind(
                            f"{cfg.url} still unreachable after {attempt} reconnect attempts over "
                            f"{time.monotonic() - start:.1f}s: {exc}; "
                            "raise reconnect_attempts or check the server"
                        ) from exc
                    delay = backoff_s(attempt, cfg.reconnect_backoff_s, cfg.reconnect_backoff_max_s)
                    attempt += 1
                    _log.warning("redis %s: %s; reconnect attempt %d in %.2fs", cfg.url, exc, attempt, delay)
                    time.sleep(delay)  # backoff between attempts, not a wait for an event

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        r = cast(Any, self._r)
        try:
            return r.evalsha(script.sha, len(keys), *keys, *args)
        except rx.NoScriptError:  # a restarted server forgot its script cache
            r.script_load(script.text)
            return r.evalsha(script.sha, len(keys), *keys, *args)

    def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one round trip (inside ``_call``); ``("@name", keys, args)`` is a script.

        A script the server forgot (NOSCRIPT: it did not run) is loaded and run again alone.
        """
        pipe = cast(Any, self._r.pipeline(transaction=False))
        for command in commands:
            if command[0].startswith("@"):
                sha, keys, args = self._scripts[command[0][1:]].sha, command[1], command[2]
                pipe.evalsha(sha, len(keys), *keys, *args)
            else:
                pipe.execute_command(*command)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        for i, (command, reply) in enumerate(zip(commands, replies, strict=True)):
            if isinstance(reply, rx.NoScriptError):
                replies[i] = self._script(command[0][1:], command[1], command[2])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._call(lambda _: self._script(name, keys, args))

    # -- topics -------------------------------------------------------------------------------

    def _partitions(self, topic: str, *, create: bool) -> int:
        n = self._counts.get(topic)
        if n is None:
            raw = self._call(lambda _: cast(Any, self._r).hget(self._keys.topics, topic))
            if raw is not None:
                n = int(raw)
            elif create:
                n = self._create(topic, self.config.default_partitions)
            else:
                raise TopicNotFoundError(f"no topic {topic!r} on {self.config.url}")
            self._counts[topic] = n
        return n

    def _create(self, topic: str, partitions: int) -> int:
        keys = [self._keys.topics, *self._keys.streams(topic, partitions)]
        have, _created = self._run("topic", keys, [topic, partitions])
        return int(have)

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` streams; a no-op if it exists with as many.

        Raises:
            BrokerError: if it exists with another partition count.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        have = self._create(topic, partitions)
        self._counts[topic] = have
        if have != partitions:
            raise BrokerError(f"topic {topic!r} exists with {have} partitions, not {partitions}")

    def delete_topic(self, topic: str) -> None:
        """Delete a topic, its messages, groups and commits.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        self._counts.pop(topic, None)
        n = self._partitions(topic, create=False)
        self._counts.pop(topic, None)
        while True:
            keys = [self._keys.topics, self._keys.commits(topic), *self._keys.streams(topic, n)]
            result = int(self._run("delete", keys, [topic, n]))
            if result == 0:
                return
            if result < 0:
                raise TopicNotFoundError(f"no topic {topic!r} on {self.config.url}")
            n = result

    def list_topics(self) -> list[str]:
        """Return topic names, sorted."""
        names = self._call(lambda _: cast(Any, self._r).hkeys(self._keys.topics))
        return sorted(n.decode() for n in names)

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions (offsets, depth) and groups (commits, lag, pending) of ``topic``.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        self._counts.pop(topic, None)
        n = self._partitions(topic, create=False)
        streams = self._keys.streams(topic, n)

        def fetch(_: bool) -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for key in streams:
                cast(Any, pipe).execute_command("XINFO", "STREAM", key)
                cast(Any, pipe).execute_command("XINFO", "GROUPS", key)
            pipe.hgetall(self._keys.commits(topic))
            return pipe.execute(raise_on_error=False)

        replies = self._call(fetch)
        parts: list[PartitionInfo] = []
        pending: dict[str, int] = {}
        for p in range(n):
            info, groups = replies[2 * p], replies[2 * p + 1]
            for reply in (info, groups):
                if isinstance(reply, Exception) and "no such key" not in str(reply):
                    with _map_errors(self.config.url):
                        raise reply
            fields = {} if isinstance(info, Exception) else _pairs(info)
            high = wire.id_to_offset(fields.get("last-generated-id", b"0-0")) + 1
            depth = int(fields.get("length", 0))
            first = fields.get("first-entry")
            low = wire.id_to_offset(first[0]) if depth and first else high
            parts.append(PartitionInfo(p, low, high, depth))
            for g in [] if isinstance(groups, Exception) else groups:
                gf = _pairs(g)
                name = gf["name"].decode()
                pending[name] = pending.get(name, 0) + int(gf["pending"])
        commits: dict[str, dict[int, int]] = {}
        for raw_field, raw_id in replies[-1].items():
            group, _, p_text = raw_field.decode().rpartition(":")
            commits.setdefault(group, {})[int(p_text)] = wire.id_to_offset(raw_id)
        infos = []
        for name in sorted(pending):
            committed = commits.get(name, {})
            lag = {pi.partition: pi.high - max(committed.get(pi.partition, pi.low), pi.low) for pi in parts}
            infos.append(GroupInfo(name, committed, lag, pending[name]))
        return TopicInfo(topic, tuple(parts), tuple(infos))

    def trim(self, topic: str, *, committed: bool = True, max_messages: int | None = None) -> int:
        """Drop messages every group has committed past, and/or all but the newest ``max_messages``.

        Returns:
            how many messages were dropped.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        check_trim_limits(max_messages=max_messages)
        n = self._partitions(topic, create=False)
        keys = [self._keys.commits(topic), *self._keys.streams(topic, n)]
        args = ["1" if committed else "0", "" if max_messages is None else max_messages]
        return int(self._run("trim", keys, args))

    # -- publish ------------------------------------------------------------------------------

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Append messages in order, in atomic batches; all-or-nothing on size checks.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing is written.
            BrokerError: the broker failed (earlier batches may have been written).
        """
        check_topic_name(topic)
        limit = self.config.max_payload_bytes
        prepared: list[tuple[bytes, bytes | None, dict[str, str], int | None]] = []
        for m in messages:
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            payload = check_payload(msg.payload, limit)
            prepared.append((payload, normalize_key(msg.key), check_headers(msg.headers), msg.partition))
        if not prepared:
            return
        n = self._partitions(topic, create=True)
        start = 0
        while start < len(prepared):
            end, args = self._encode(prepared, start, n)
            keys = [self._keys.topics, *self._keys.streams(topic, n)]
            ok, value = self._run("publish", keys, [topic, n, *args])
            if ok:
                start = end
            else:  # the topic was re-created with another partition count meanwhile
                self._counts[topic] = n = int(value)

    def _encode(
        self, prepared: list[tuple[bytes, bytes | None, dict[str, str], int | None]], start: int, n: int
    ) -> tuple[int, list[Any]]:
        args: list[Any] = []
        size = 0
        end = start
        for payload, key, headers, partition in prepared[start:]:
            if end - start >= PUBLISH_BATCH or (size and size + len(payload) > PUBLISH_BATCH_BYTES):
                break
            if partition is not None:
                if not 0 <= partition < n:
                    raise ValueError(f"partition {partition} out of range 0..{n - 1}")
            elif n == 1:
                partition = 0
            elif key is not None:
                partition = partition_for_key(key, n)
            else:
                partition = next(self._round_robin) % n
            if key is None and not headers:
                args += (partition, 1, b"p", payload)
            else:
                fields = wire.encode_fields(payload, key, headers)
                args += (partition, len(fields) // 2, *fields)
            size += len(payload)
            end += 1
        if start == 0:  # an explicit partition out of range fails before anything is written
            for *_, partition in prepared[end:]:
                if partition is not None and not 0 <= partition < n:
                    raise ValueError(f"partition {partition} out of range 0..{n - 1}")
        return end, args

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
        """Join ``group`` on ``topic`` (creating both if missing)."""
        check_topic_name(topic)
        if not isinstance(group, str) or not group:
            raise ValueError(f"group must be a non-empty string, got {group!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if dead_letter_topic is not None:
            check_topic_name(dead_letter_topic)
        n = self._partitions(topic, create=True)
        chosen = list(range(n)) if partitions is None else list(partitions)
        for p in chosen:
            if not 0 <= p < n:
                raise ValueError(f"partition {p} out of range 0..{n - 1} of {topic!r}")
        streams = self._keys.streams(topic, n)

        def create(_: bool) -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for key in streams:
                pipe.xgroup_create(key, group, "0" if start == "earliest" else "$", mkstream=True)
            return pipe.execute(raise_on_error=False)

        for reply in self._call(create):
            if isinstance(reply, Exception) and not str(reply).startswith("BUSYGROUP"):
                with _map_errors(self.config.url):
                    raise reply
        consumer = _RedisConsumer(self, topic, group, n, chosen, dead_letter_topic)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Close this broker's consumers (giving their leases back), then the connections."""
        if self._closed:
            return
        with self._lock:
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.close()
        self._closed = True
        self._r.close()

    def __repr__(self) -> str:
        return f"<RedisBroker {self.config.url}>"


def _pairs(flat: list[Any]) -> dict[str, Any]:
    it = iter(flat)
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in zip(it, it, strict=True)}
