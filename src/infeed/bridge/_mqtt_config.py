"""``MqttBridgeConfig``: what ``mqtt://HOST:PORT/FILTER?OPTIONS`` says, checked; topic filters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Self
from urllib.parse import unquote, urlsplit

from infeed.brokers._url import parse_options
from infeed.errors import ConfigError

#: MQTT's registered port for plain TCP.
DEFAULT_PORT = 1883
#: Most messages handed to one ``publish_many``.
DEFAULT_MAX_BATCH = 500
#: Longest the oldest collected message waits for its batch to fill before the batch goes anyway.
DEFAULT_MAX_WAIT_S = 0.02
#: Unacked messages the MQTT broker may have in flight to the bridge (MQTT 5 Receive Maximum).
DEFAULT_RECEIVE_MAXIMUM = 1000
#: The window assumed under MQTT 3.1.1, which cannot ask for one: mosquitto's max_inflight_messages.
DEFAULT_INFLIGHT_V311 = 20
#: How long the MQTT broker keeps the session (subscriptions, unacked and queued messages) while
#: the bridge is away.
DEFAULT_SESSION_EXPIRY_S = 86400.0
#: Seconds between keep-alive pings on an idle connection.
DEFAULT_KEEPALIVE_S = 60.0
#: How long ``start()`` waits for the connection and the subscriptions to be accepted.
DEFAULT_CONNECT_TIMEOUT_S = 10.0

MAX_SESSION_EXPIRY = 0xFFFFFFFF  # MQTT 5: "never expires"
RETAINED = ("new", "all", "skip")


@dataclass(frozen=True, kw_only=True)
class MqttBridgeConfig:
    """Where to subscribe and how to batch; ``from_url`` reads it from ``mqtt://HOST:PORT/FILTER?...``.

    Attributes:
        host: the MQTT broker's host.
        port: its TCP port.
        filters: MQTT topic filters (``+`` and ``#`` wildcards, ``$share/GROUP/...``).
        username: user name, from the URL's user info.
        password: password, from the URL's user info.
        qos: 1 (at least once: acked only after infeed holds the message) or 0 (may lose).
        protocol: MQTT version, "5" or "3.1.1".
        client_id: fixed client id that names the persistent session; default
            ``infeed-bridge-<target topic>``. Two bridges must never share one.
        clean_start: start with a fresh session (drops what the broker kept for the bridge).
        session_expiry_s: MQTT 5: how long the broker keeps the session after a disconnect.
        receive_maximum: MQTT 5: the most unacked messages the broker may send at once. MQTT 3.1.1
            cannot send it: set it to the broker's in-flight limit (mosquitto: 20).
        max_batch: most messages per ``publish_many``.
        max_wait_s: longest a message waits for its batch to fill.
        keepalive_s: keep-alive interval.
        connect_timeout_s: how long ``start()`` waits for CONNACK and SUBACK.
        retained: retained messages on subscribe: "new" (only for a subscription the session
            did not have; MQTT 3.1.1 cannot tell and acts as "all"), "all", or "skip".
        key: partitioning key: "topic" (the MQTT topic: each sensor in one partition, in order)
            or "none".
    """

    host: str
    port: int = DEFAULT_PORT
    filters: tuple[str, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    qos: int = 1
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    clean_start: bool = False
    session_expiry_s: float = DEFAULT_SESSION_EXPIRY_S
    receive_maximum: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    retained: Literal["new", "all", "skip"] = "new"
    key: Literal["topic", "none"] = "topic"

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.filters:
            raise ValueError("no MQTT topic filter given")
        for topic_filter in self.filters:
            check_filter(topic_filter)
        if self.qos not in (0, 1):
            raise ValueError(
                f"qos must be 0 or 1, got {self.qos}: paho acknowledges QoS 2 (PUBREC) before the "
                "message reaches the bridge, so a crash could lose it; use 1"
            )
        if self.protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {self.protocol!r}")
        if self.client_id == "":
            raise ValueError("client_id must not be empty: the session that redelivers is named by it")
        if not 0 <= self.session_expiry_s <= MAX_SESSION_EXPIRY:
            raise ValueError(
                f"session_expiry_s must be in 0..{MAX_SESSION_EXPIRY}, got {self.session_expiry_s}"
            )
        if self.receive_maximum is not None and not 0 < self.receive_maximum < 65536:
            raise ValueError(f"receive_maximum must be in 1..65535, got {self.receive_maximum}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_wait_s <= 60:
            raise ValueError(f"max_wait_s must be in 0..60 seconds, got {self.max_wait_s}")
        if not 1 <= self.keepalive_s <= 65535:
            raise ValueError(f"keepalive_s must be in 1..65535, got {self.keepalive_s}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.retained not in RETAINED:
            raise ValueError(f"retained must be one of new, all, skip; got {self.retained!r}")
        if self.key not in ("topic", "none"):
            raise ValueError(f"key must be 'topic' or 'none', got {self.key!r}")

    @property
    def window(self) -> int:
        """The most unacked messages the MQTT broker sends before it waits for PUBACKs."""
        if self.receive_maximum is not None:
            return self.receive_maximum
        return DEFAULT_RECEIVE_MAXIMUM if self.protocol == "5" else DEFAULT_INFLIGHT_V311

    @classmethod
    def from_url(cls, url: str, *, filters: Iterable[str] = ()) -> Self:
        """Read ``mqtt://[USER:PASSWORD@]HOST[:PORT][/FILTER][?OPTION=VALUE&...]``.

        The path is one topic filter; ``#`` may be written as is (it is not read as a URL
        fragment) or as ``%23``. Options are the attribute names (``?qos=1&max_batch=200``).

        Args:
            url: the MQTT URL.
            filters: more topic filters (the CLI's ``--filter``).

        Raises:
            ConfigError: naming a wrong scheme, host, port, filter or option.
        """
        parts = urlsplit(url, allow_fragments=False)
        shown = redact(url)
        if parts.scheme.lower() != "mqtt":
            raise ConfigError(
                f"MQTT URL {shown!r} must start with mqtt:// (TLS and websockets are not supported yet)"
            )
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ConfigError(f"MQTT URL {shown!r} has a bad port: {exc}") from exc
        if not parts.hostname:
            raise ConfigError(f"MQTT URL {shown!r} names no host; expected mqtt://HOST:PORT/FILTER")
        path_filter = unquote(parts.path[1:])
        wanted = tuple(dict.fromkeys([*([path_filter] if path_filter else []), *filters]))
        if not wanted:
            raise ConfigError(
                f"MQTT URL {shown!r} has no topic filter: put one in its path "
                "(mqtt://HOST:PORT/sensors/+/temp) or pass --filter"
            )
        for topic_filter in wanted:
            try:
                check_filter(topic_filter)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return parse_options(
            parts.query,
            cls,
            host=parts.hostname,
            port=port,
            filters=wanted,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def check_filter(topic_filter: str) -> None:
    """Raise ValueError unless ``topic_filter`` is a valid MQTT topic filter."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise ValueError(f"MQTT topic filter must be a non-empty string, got {topic_filter!r}")
    if "\x00" in topic_filter or len(topic_filter.encode()) > 65535:
        raise ValueError(f"MQTT topic filter {topic_filter!r} has a NUL character or is over 65535 bytes")
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or set(parts[1]) & {"+", "#"} or not parts[2]:
            raise ValueError(f"shared subscription {topic_filter!r} must be $share/GROUP/FILTER")
    levels = strip_share(topic_filter).split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"MQTT topic filter {topic_filter!r}: '#' must be a whole level, and the last")
        if "+" in level and level != "+":
            raise ValueError(f"MQTT topic filter {topic_filter!r}: '+' must be a whole level")


def strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def matches(filter_levels: list[str], levels: list[str]) -> bool:
    """MQTT topic matching; wildcards at the first level do not match ``$SYS``-style topics."""
    if levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, want in enumerate(filter_levels):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(levels) == len(filter_levels)


def redact(url: str) -> str:
    """The URL with its password replaced, for error messages."""
    parts = urlsplit(url, allow_fragments=False)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
