"""MQTT into infeed, at least once: ``MqttBridge`` subscribes to topic filters and forwards.

The ack ordering is the whole guarantee. paho-mqtt runs in manual-ack mode, so a QoS 1 PUBLISH
from the MQTT broker is not PUBACKed when it arrives. The bridge collects arrivals, hands them to
``Broker.publish_many`` in batches (by count, by the broker's in-flight window, or after
``max_wait_s``), and only once that call has returned — the infeed broker holds the batch durably —
sends their PUBACKs. A bridge that dies in between leaves the messages unacknowledged in its
persistent MQTT session (fixed client id, clean start off, a session expiry), and the MQTT broker
sends them again when the bridge comes back. Messages are never lost that way; some are forwarded
twice (docs/mqtt.md says what MQTT can and cannot promise, and how to de-duplicate).

A PUBACK is only sent on the connection its PUBLISH came in on: packet ids are per connection, so
a stale PUBACK on a new connection could acknowledge a different message.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, NamedTuple, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from infeed.bridge._mqtt_config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_INFLIGHT_V311,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_PORT,
    DEFAULT_RECEIVE_MAXIMUM,
    DEFAULT_SESSION_EXPIRY_S,
    MqttBridgeConfig,
    matches,
    strip_share,
)
from infeed.brokers import Broker, Message, dead_letter_topic
from infeed.brokers.base import DLQ_HEADER_REASON, check_topic_name
from infeed.errors import BrokerConnectionError, BrokerTimeoutError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_INFLIGHT_V311",
    "DEFAULT_KEEPALIVE_S",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_WAIT_S",
    "DEFAULT_PORT",
    "DEFAULT_RECEIVE_MAXIMUM",
    "DEFAULT_SESSION_EXPIRY_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "HEADER_QOS",
    "HEADER_RETAIN",
    "HEADER_TOPIC",
    "HEADER_USER_PREFIX",
    "BridgeStats",
    "MqttBridge",
    "MqttBridgeConfig",
]

log = logging.getLogger(__name__)

#: How long ``stop()`` waits for the batch in hand to be forwarded.
DEFAULT_STOP_TIMEOUT_S = 30.0

#: Header with the concrete MQTT topic a message was published to.
HEADER_TOPIC = "mqtt-topic"
#: Header with the QoS the message was delivered to the bridge at ("0" or "1").
HEADER_QOS = "mqtt-qos"
#: Header with "true" for a retained message the broker sent on subscribe, else "false".
HEADER_RETAIN = "mqtt-retain"
#: Prefix of the headers that carry MQTT 5 user properties (``mqtt-user-<name>``).
HEADER_USER_PREFIX = "mqtt-user-"

_SETTLE_TIMEOUT_S = 5.0  # for the UNSUBACK that confirms the last PUBACKs
_SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code
_RETAIN_HANDLING = {
    "all": SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE,
    "new": SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
    "skip": SubscribeOptions.RETAIN_DO_NOT_SEND,
}


@dataclass(frozen=True, slots=True)
class BridgeStats:
    """Counters of a bridge run.

    Attributes:
        received: messages that arrived from MQTT.
        forwarded: messages published to the infeed topic.
        batches: ``publish_many`` calls.
        redelivered: arrivals with MQTT's DUP flag: sent before on this hop, perhaps to a bridge
            that died before acknowledging them (likely duplicates in infeed).
        dead_lettered: messages over the infeed broker's size limit, recorded without payload in
            ``TOPIC.dlq`` and acknowledged.
        ignored: acknowledged but not forwarded: matching no filter (a subscription an earlier
            run left in the session), or retained when ``retained=skip``.
        reconnects: connections to the MQTT broker after the first.
        sessions_lost: reconnects that found no session: what it held is gone.
        seconds: time since ``start()``.
    """

    received: int = 0
    forwarded: int = 0
    batches: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    reconnects: int = 0
    sessions_lost: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Forwarded messages per second."""
        return self.forwarded / self.seconds if self.seconds > 0 else 0.0


class _Arrival(NamedTuple):
    connection: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    retain: bool
    user: tuple[tuple[str, str], ...]
    at: float


class MqttBridge:
    """Forward messages from MQTT topic filters into one infeed topic, at least once.

    Use ``run()``, or ``start()``, ``wait()`` and ``stop()`` (also as a context manager). The
    bridge does not own ``broker``: close it yourself.

    Args:
        config: where to subscribe and how to batch.
        broker: the infeed broker to publish to (any backend).
        topic: the infeed topic (created as the backend creates topics on publish).

    Raises:
        ValueError: for a bad topic name.
    """

    def __init__(self, config: MqttBridgeConfig, broker: Broker, topic: str) -> None:
        check_topic_name(topic)
        self.config = config
        self.broker = broker
        self.topic = topic
        #: The client id that names the persistent MQTT session.
        self.client_id = config.client_id or f"infeed-bridge-{topic}"
        self._filters = [strip_share(f).split("/") for f in config.filters]
        self._flush_at = min(config.max_batch, config.window)
        self._cond = threading.Condition()
        self._pending: deque[_Arrival] = deque()
        self._stopping = False
        self._limit: int | None = None
        self._taken = 0
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._subscribed = threading.Event()
        self._unsubscribed = threading.Event()
        # Guards the connection counter and every PUBACK (see the module docstring).
        self._conn_lock = threading.Lock()
        self._connection = 0
        self._connected = False
        self._n = dict.fromkeys((f.name for f in fields(BridgeStats) if f.name != "seconds"), 0)
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._warned_unmatched = False
        self._client: mqtt.Client | None = None
        self._forwarder: threading.Thread | None = None

    # --- public --------------------------------------------------------------------------------

    @property
    def stats(self) -> BridgeStats:
        """A snapshot of the counters."""
        with self._cond:
            start = self._started_at
            end = self._stopped_at if self._stopped_at is not None else time.monotonic()
            return BridgeStats(**self._n, seconds=end - start if start is not None else 0.0)

    def start(self, *, max_messages: int | None = None) -> None:
        """Connect, subscribe and start forwarding; returns once the subscriptions are granted.

        Args:
            max_messages: take exactly this many messages from MQTT (forwarded, dead-lettered or
                ignored), then stop taking them: later ones stay unacknowledged in the session for
                the next run.

        Raises:
            BrokerConnectionError: the MQTT broker cannot be reached or refused the connection or
                a subscription.
            BrokerTimeoutError: no CONNACK or SUBACK within ``connect_timeout_s``.
        """
        if self._client is not None:
            raise RuntimeError("the bridge was already started; make a new MqttBridge")
        if max_messages is not None and max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self._limit = max_messages
        self._started_at = time.monotonic()
        self._client = client = self._make_client()
        cfg = self.config
        try:
            if cfg.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.ReceiveMaximum = cfg.window
                props.SessionExpiryInterval = math.ceil(cfg.session_expiry_s)
                clean: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY if cfg.clean_start else False
                client.connect(
                    cfg.host, cfg.port, math.ceil(cfg.keepalive_s), clean_start=clean, properties=props
                )
            else:
                client.connect(cfg.host, cfg.port, math.ceil(cfg.keepalive_s))
        except OSError as exc:
            self._client = None
            raise BrokerConnectionError(
                f"cannot reach the MQTT broker at {cfg.host}:{cfg.port}: {exc}; is it running?"
            ) from exc
        client.loop_start()
        self._forwarder = threading.Thread(target=self._forward_loop, name="infeed-mqtt-bridge", daemon=True)
        self._forwarder.start()
        if not self._subscribed.wait(cfg.connect_timeout_s) or self._error is not None:
            error = self._error or BrokerTimeoutError(
                f"the MQTT broker at {cfg.host}:{cfg.port} did not accept the connection and "
                f"subscriptions within {cfg.connect_timeout_s:g} s (connect_timeout_s)"
            )
            self._shutdown(DEFAULT_STOP_TIMEOUT_S)
            raise error

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until ``max_messages`` were forwarded or the bridge failed; return whether it did."""
        return self._done.wait(timeout_s)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> BridgeStats:
        """Forward what was collected, acknowledge it, disconnect; idempotent.

        The session stays with the MQTT broker, so what arrives after this is kept for the next
        run (up to the broker's queue limits).

        Returns:
            The final counters.

        Raises:
            BrokerError: the error that stopped forwarding, if any (nothing after it was acked).
        """
        self._shutdown(timeout_s)
        if self._error is not None:
            raise self._error
        return self.stats

    def run(
        self,
        until: Callable[[BridgeStats], bool] | None = None,
        *,
        max_messages: int | None = None,
        on_tick: Callable[[BridgeStats], None] | None = None,
        tick_s: float = 0.25,
    ) -> BridgeStats:
        """Forward until ``until(stats)`` is true, ``max_messages`` are forwarded, or an error.

        Starts the bridge unless ``start()`` was called; always stops it (also on Ctrl-C).

        Args:
            until: checked every ``tick_s``; return True to stop.
            max_messages: see ``start()``.
            on_tick: called with the counters every ``tick_s`` (progress displays).
            tick_s: seconds between checks.

        Returns:
            The final counters.

        Raises:
            BrokerError: what stopped the bridge.
        """
        if self._client is None:
            self.start(max_messages=max_messages)
        try:
            while not self._done.wait(tick_s):
                stats = self.stats
                if on_tick is not None:
                    on_tick(stats)
                if until is not None and until(stats):
                    break
        finally:
            stats = self.stop()
        return stats

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        cfg = self.config
        return f"<MqttBridge mqtt://{cfg.host}:{cfg.port} {list(cfg.filters)} -> {self.topic}>"

    # --- the MQTT side (paho's network thread) ----------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else cfg.clean_start,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.connect_timeout = cfg.connect_timeout_s
        client.reconnect_delay_set(1, 16)
        client.on_socket_open = self._guard(_set_nodelay)
        client.on_connect = self._guard(self._on_connect)
        client.on_subscribe = self._guard(self._on_subscribe)
        client.on_disconnect = self._guard(self._on_disconnect)
        client.on_unsubscribe = lambda *_args: self._unsubscribed.set()
        client.on_message = self._guard(self._on_message)
        return client

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Keep exceptions out of paho's thread (they would end it): they stop the bridge instead."""

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                self._fail(exc)

        return guarded

    def _on_connect(
        self, client: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        cfg = self.config
        if rc.is_failure:
            self._fail(
                BrokerConnectionError(
                    f"the MQTT broker at {cfg.host}:{cfg.port} refused the connection: {rc}"
                )
            )
            return
        with self._conn_lock:
            self._connection += 1
            self._connected = True
            first = self._connection == 1
        if not first:
            lost = not flags.session_present and not (cfg.clean_start and cfg.protocol == "3.1.1")
            self._count(reconnects=1, sessions_lost=int(lost))
            if lost:
                log.warning(
                    "the MQTT broker kept no session for %s: what it held for the bridge is lost",
                    self.client_id,
                )
        # Subscribing again on every connect restores the filters of a session that was lost;
        # with MQTT 5's "retain handling" an existing subscription does not resend retained messages.
        if cfg.protocol == "5":
            opts = SubscribeOptions(qos=cfg.qos, retainHandling=_RETAIN_HANDLING[cfg.retained])
            client.subscribe([(f, opts) for f in cfg.filters])
        else:
            client.subscribe([(f, cfg.qos) for f in cfg.filters])

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        for topic_filter, code in zip(self.config.filters, codes, strict=False):
            if code.is_failure or code.value < self.config.qos:
                self._fail(
                    BrokerConnectionError(
                        f"the MQTT broker did not grant QoS {self.config.qos} on {topic_filter!r}: {code}"
                        + ("; pass qos=0 to accept at-most-once" if not code.is_failure else "")
                    )
                )
                return
        self._subscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: mqtt.DisconnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        with self._conn_lock:
            self._connection += 1  # PUBACKs for what came in on the old connection are void
            self._connected = False
        with self._cond:
            stopping = self._stopping
        if rc.value == _SESSION_TAKEN_OVER:
            self._fail(
                BrokerConnectionError(
                    f"another MQTT client connected with client id {self.client_id!r} and took over the "
                    "session; give every bridge its own client_id"
                )
            )
        elif not stopping:
            log.warning("lost the connection to the MQTT broker (%s); reconnecting", rc)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = tuple(getattr(props, "UserProperty", ()) or ())
        with self._conn_lock:
            connection = self._connection
        arrival = _Arrival(
            connection,
            msg.mid,
            msg.qos,
            msg.topic,
            bytes(msg.payload),
            bool(msg.retain),
            user,
            time.monotonic(),
        )
        with self._cond:
            self._pending.append(arrival)
            self._n["received"] += 1
            if msg.dup:
                self._n["redelivered"] += 1
            if len(self._pending) == 1 or len(self._pending) >= self._flush_at:
                self._cond.notify_all()

    # --- the infeed side (the forwarder thread) ---------------------------------------------------

    def _forward_loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._forward(batch)
        except BaseException as exc:
            self._fail(exc)

    def _next_batch(self) -> list[_Arrival] | None:
        """Wait for a batch: ``max_batch`` messages, a full in-flight window, or ``max_wait_s``."""
        with self._cond:
            while True:
                if self._error is not None or (self._limit is not None and self._taken >= self._limit):
                    return None
                if self._pending:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            target = self._flush_at
            if self._limit is not None:
                target = min(target, self._limit - self._taken)
            deadline = self._pending[0].at + self.config.max_wait_s
            while len(self._pending) < target and not self._stopping and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._pending.popleft() for _ in range(min(target, len(self._pending)))]
            self._taken += len(batch)
            return batch

    def _forward(self, batch: Sequence[_Arrival]) -> None:
        limit = self.broker.max_payload_bytes
        messages: list[Message] = []
        too_large: list[Message] = []
        ignored = 0
        for arrival in batch:
            if not self._wanted(arrival):
                ignored += 1
                continue
            headers = {
                HEADER_TOPIC: arrival.topic,
                HEADER_QOS: str(arrival.qos),
                HEADER_RETAIN: "true" if arrival.retain else "false",
            }
            headers.update((HEADER_USER_PREFIX + name, value) for name, value in arrival.user)
            key = arrival.topic if self.config.key == "topic" else None
            if len(arrival.payload) > limit:
                headers[DLQ_HEADER_REASON] = (
                    f"MQTT payload of {len(arrival.payload)} bytes is over the broker's limit of {limit}"
                )
                too_large.append(Message(b"", key, headers))
            else:
                messages.append(Message(arrival.payload, key, headers))
        if messages:
            self.broker.publish_many(self.topic, messages)
        if too_large:
            log.warning("%d MQTT messages over %d bytes went to %s", len(too_large), limit, self._dlq)
            self.broker.publish_many(self._dlq, too_large)
        # Only now, with the batch durable in infeed, may the MQTT broker forget it.
        with self._conn_lock:
            if self._connected and self._client is not None:
                for arrival in batch:
                    if arrival.connection == self._connection and arrival.qos > 0:
                        self._client.ack(arrival.mid, arrival.qos)
        self._count(
            forwarded=len(messages), batches=1, dead_lettered=len(too_large), ignored=ignored, notify=True
        )
        if self._limit is not None and self._taken >= self._limit:
            self._done.set()

    @property
    def _dlq(self) -> str:
        return dead_letter_topic(self.topic)

    def _wanted(self, arrival: _Arrival) -> bool:
        if arrival.retain and self.config.retained == "skip":
            return False
        levels = arrival.topic.split("/")
        if any(matches(f, levels) for f in self._filters):
            return True
        if not self._warned_unmatched:
            self._warned_unmatched = True
            log.warning(
                "ignoring messages on %r, which matches none of %s: a subscription an earlier run left "
                "in the session of %s (clean_start=true drops it)",
                arrival.topic,
                list(self.config.filters),
                self.client_id,
            )
        return False

    # --- bookkeeping ---------------------------------------------------------------------------

    def _count(self, *, notify: bool = False, **deltas: int) -> None:
        with self._cond:
            for name, delta in deltas.items():
                self._n[name] += delta
            if notify:
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()
        self._done.set()
        self._subscribed.set()  # wakes start()

    def _shutdown(self, timeout_s: float) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        if self._forwarder is not None:
            self._forwarder.join(timeout_s)
            if self._forwarder.is_alive():
                log.warning(
                    "the batch in hand was not forwarded within %.1f s; leaving it unacked", timeout_s
                )
        client = self._client
        if client is not None:
            self._settle(client, timeout_s)
            client.disconnect()
            client.loop_stop()
            sock = client.socket()
            if isinstance(sock, socket.socket):
                sock.close()
        with self._cond:
            self._stopped_at = time.monotonic()

    def _settle(self, client: mqtt.Client, timeout_s: float) -> None:
        """Wait until the MQTT broker has read every PUBACK sent so far.

        Closing a socket with unread incoming data (the broker still streaming to us) sends a TCP
        RST, and the broker drops whatever it had not read yet: the last PUBACKs of a run stopped
        mid-stream were lost that way (190 of 500 once), and their messages came again next run.
        The broker handles a client's packets in order, so an UNSUBACK for a filter we never
        subscribed says every PUBACK before it was processed.
        """
        with self._conn_lock:
            if not self._connected:
                return
        self._unsubscribed.clear()
        rc, _mid = client.unsubscribe(f"infeed-bridge/barrier/{uuid.uuid4().hex}")
        if rc == mqtt.MQTT_ERR_SUCCESS and not self._unsubscribed.wait(min(timeout_s, _SETTLE_TIMEOUT_S)):
            log.warning("the MQTT broker did not confirm the last PUBACKs; some messages may come again")


def _set_nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    # QoS 1 round trips stall 40+ ms on delayed ACKs without it (docs/mqtt.md, BROKERS.md).
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
