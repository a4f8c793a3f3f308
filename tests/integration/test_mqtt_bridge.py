"""The MQTT bridge against a real Mosquitto (``scripts/brokers start mosquitto``), into SQLite.

Every test works under its own MQTT topic root and client ids, so runs do not see each other.
Publishers are paced: Mosquitto queues at most ``max_queued_messages`` (default 1000) for a
subscriber that falls behind and silently drops the rest, even at QoS 1 — a loss no bridge can
prevent (docs/mqtt.md), and not what these tests are about.
"""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from infeed.bridge.mqtt import HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC, MqttBridge, MqttBridgeConfig
from infeed.brokers import Broker, connect
from infeed.types import Delivery
from tests.support import ROOT, broker_url, running_brokers, spawn_python

PUBLISHERS = 4
SENSORS_PER_PUBLISHER = 2
PER_SENSOR = 250
TOTAL = PUBLISHERS * SENSORS_PER_PUBLISHER * PER_SENSOR  # 2,000
PARTITIONS = 4
#: Seconds to wait for traffic, a process start or a clean exit.
DEADLINE_S = 90.0

Key = tuple[str, int]  # (MQTT topic, sequence number of that sensor)


def _address() -> tuple[str, int]:
    parts = urlsplit(broker_url("mosquitto"))
    assert parts.hostname and parts.port, parts
    return parts.hostname, parts.port


def _payload(topic: str, seq: int) -> bytes:
    # Binary on purpose: the bridge must forward the bytes unchanged.
    return f"{topic}|{seq}|".encode() + bytes([0, 255, seq % 256]) + b"\x80end"


def _key(delivery: Delivery) -> Key:
    topic, seq, _ = delivery.payload.split(b"|", 2)
    return topic.decode(), int(seq)


def _nodelay(_c: mqtt.Client, _u: object, sock: object) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _client(client_id: str, protocol: MQTTProtocolVersion = mqtt.MQTTv311) -> mqtt.Client:
    host, port = _address()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.on_socket_open = _nodelay
    client.connect(host, port)
    client.loop_start()
    return client


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


class _Publishers:
    """MQTT clients publishing sensor readings at QoS 1, paced; ``acked`` is what Mosquitto PUBACKed."""

    def __init__(
        self,
        root: str,
        *,
        publishers: int = PUBLISHERS,
        sensors: int = SENSORS_PER_PUBLISHER,
        per_sensor: int = PER_SENSOR,
        rate_per_s: float,
    ) -> None:
        self.root = root
        self.topics = [[f"{root}/sensors/{p}-{s}/temp" for s in range(sensors)] for p in range(publishers)]
        self.per_sensor = per_sensor
        self.interval_s = publishers / rate_per_s  # between two messages of one publisher
        self.acked: set[Key] = set()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(publishers)
        ]

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.topics) * self.per_sensor

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> set[Key]:
        for t in self._threads:
            t.join(DEADLINE_S)
            assert not t.is_alive(), "a publisher did not finish"
        if self.errors:
            raise AssertionError("a publisher failed") from self.errors[0]
        return self.acked

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(DEADLINE_S)

    def _run(self, index: int) -> None:
        try:
            client = _client(f"{self.root}-pub-{index}")
            try:
                sent: list[tuple[mqtt.MQTTMessageInfo, Key]] = []
                started = time.monotonic()
                for seq in range(self.per_sensor):
                    for topic in self.topics[index]:
                        sent.append((client.publish(topic, _payload(topic, seq), qos=1), (topic, seq)))
                        ahead = started + len(sent) * self.interval_s - time.monotonic()
                        if ahead > 0 and self._stop.wait(ahead):
                            return
                for info, key in sent:
                    info.wait_for_publish(DEADLINE_S)
                    if info.is_published():
                        with self._lock:
                            self.acked.add(key)
            finally:
                _close(client)
        except BaseException as exc:
            self.errors.append(exc)


class _Collector:
    """Reads the infeed topic in a group of its own and keeps every delivery, duplicates included."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.consumer = broker.subscribe(topic, group=f"check-{uuid.uuid4().hex[:8]}")
        self.deliveries: list[Delivery] = []

    def until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what} ({len(self.deliveries)} so far)"
            )
            self._take()

    def drain(self) -> None:
        """Take what is left (the bridges are stopped)."""
        while self._take():
            pass

    def _take(self) -> int:
        batch = self.consumer.receive(max_messages=1000, timeout_s=0.5)
        if batch:
            self.consumer.ack(batch)
            self.deliveries.extend(batch)
        return len(batch)

    def counts(self) -> collections.Counter[Key]:
        return collections.Counter(_key(d) for d in self.deliveries)


class _BridgeProcess:
    """``python -m infeed bridge ...`` as a real child process."""

    def __init__(self, url: str, db: Path, topic: str) -> None:
        self.proc = spawn_python(
            "-m",
            "infeed",
            "bridge",
            url,
            "--to",
            topic,
            "--broker",
            f"sqlite:///{db}",
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("bridging "):
                self.ready.set()
        self.ready.set()  # EOF: the process is gone; wait_ready() tells which

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        assert self.ready.wait(DEADLINE_S), f"the bridge did not start:\n{self.output}"
        assert self.proc.poll() is None, f"the bridge exited with {self.proc.returncode}:\n{self.output}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(DEADLINE_S)
        self.close()
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE_S)
        self._reader.join(DEADLINE_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _check_sensor_order(deliveries: list[Delivery]) -> dict[str, int]:
    """Each sensor in one partition, its first deliveries in publish order; return sensor -> partition."""
    by_topic: dict[str, list[Delivery]] = collections.defaultdict(list)
    for d in deliveries:
        by_topic[_key(d)[0]].append(d)
    placed: dict[str, int] = {}
    for topic, items in by_topic.items():
        partitions = {d.partition for d in items}
        assert len(partitions) == 1, f"{topic} spread over partitions {partitions}"
        placed[topic] = partitions.pop()
        firsts = list(dict.fromkeys(_key(d)[1] for d in sorted(items, key=lambda d: d.position.offset)))
        assert firsts == sorted(firsts), f"{topic} out of order: {firsts[:20]}..."
    return placed


@pytest.mark.needs_broker("mosquitto")
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sensor_stream_arrives_complete_in_order_with_headers(tmp_path: Path, protocol: str) -> None:
    host, port = _address()
    root = f"t{uuid.uuid4().hex[:10]}"
    url = (
        f"mqtt://{host}:{port}/{root}/sensors/+/temp?protocol={protocol}&client_id={root}&session_expiry_s=60"
    )
    with connect(f"sqlite:///{tmp_path / 'q.db'}") as broker:
        broker.create_topic("sensors", partitions=PARTITIONS)
        bridge = MqttBridge(MqttBridgeConfig.from_url(url), broker, "sensors")
        bridge.start(max_messages=TOTAL)
        publishers = _Publishers(root, rate_per_s=500)
        try:
            publishers.start()
            acked = publishers.join()
            assert bridge.wait(DEADLINE_S), f"forwarded only {bridge.stats.forwarded} of {TOTAL}"
        finally:
            publishers.stop()
            stats = bridge.stop()
        collector = _Collector(broker, "sensors")
        collector.until(lambda: len(collector.deliveries) >= TOTAL, f"{TOTAL} messages")
        collector.drain()
        collector.consumer.close()

    assert len(acked) == TOTAL
    counts = collector.counts()
    assert set(counts) == acked, f"missing {len(acked - set(counts))}"
    assert max(counts.values()) == 1, "no failure was injected, so no message may come twice"
    assert (stats.forwarded, stats.redelivered, stats.reconnects) == (TOTAL, 0, 0)
    for d in collector.deliveries:
        topic, seq = _key(d)
        assert d.payload == _payload(topic, seq)
        assert d.key == topic.encode()
        assert dict(d.headers) == {HEADER_TOPIC: topic, HEADER_QOS: "1", HEADER_RETAIN: "false"}
    placed = _check_sensor_order(collector.deliveries)
    assert len(placed) == PUBLISHERS * SENSORS_PER_PUBLISHER
    assert len(set(placed.values())) > 1, "the MQTT topic is the key: sensors spread over partitions"
    for topic in placed:  # no duplicates here, so the order is exactly the publish order
        seqs = [
            _key(d)[1]
            for d in sorted(collector.deliveries, key=lambda d: d.position.offset)
            if _key(d)[0] == topic
        ]
        assert seqs == list(range(PER_SENSOR))


@pytest.mark.slow
@pytest.mark.needs_broker("mosquitto")
@pytest.mark.timeout(300)
def test_sigkill_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """SIGKILL the bridge process three times mid-stream; every message Mosquitto acked arrives."""
    host, port = _address()
    root = f"k{uuid.uuid4().hex[:10]}"
    db = tmp_path / "q.db"
    url = f"mqtt://{host}:{port}/{root}/sensors/+/temp?client_id={root}-bridge&session_expiry_s=300&max_wait_s=0.05"
    kills = 0
    with connect(f"sqlite:///{db}") as broker:
        broker.create_topic("sensors", partitions=PARTITIONS)
        collector = _Collector(broker, "sensors")
        bridge = _BridgeProcess(url, db, "sensors")
        processes = [bridge]
        # 250 msgs/s: a restart (a new Python process) takes a few seconds, and Mosquitto keeps
        # at most 1000 messages for the absent bridge.
        publishers = _Publishers(root, rate_per_s=250)
        try:
            bridge.wait_ready()
            publishers.start()
            for share in (0.25, 0.5, 0.75):
                wanted = int(share * TOTAL)
                collector.until(lambda: len(collector.deliveries) >= wanted, f"{wanted} messages")  # noqa: B023
                bridge.kill()
                kills += 1
                bridge = _BridgeProcess(url, db, "sensors")
                processes.append(bridge)
                bridge.wait_ready()
            acked = publishers.join()
            assert len(acked) == TOTAL, "Mosquitto runs throughout: it acknowledges every publish"
            collector.until(lambda: acked <= set(collector.counts()), "every acknowledged message")
            rc = bridge.terminate()
            assert rc == 0, bridge.output
            assert "bridged " in bridge.output and "stopped by SIGTERM" in bridge.output, bridge.output
            collector.drain()
        finally:
            publishers.stop()
            for p in processes:
                p.close()
            collector.consumer.close()

    counts = collector.counts()
    missing = acked - set(counts)
    assert not missing, f"{len(missing)} acknowledged messages never arrived, e.g. {sorted(missing)[:5]}"
    assert set(counts) == acked
    duplicates = sum(n - 1 for n in counts.values())
    _check_sensor_order(collector.deliveries)
    record_property("duplicates", duplicates)
    print(f"\nMQTT bridge SIGKILLed {kills}x: {TOTAL} messages, {duplicates} duplicates in infeed")


@pytest.mark.needs_broker("mosquitto")
def test_stop_at_max_messages_then_resume_forwards_each_message_once(tmp_path: Path) -> None:
    """A graceful stop mid-stream acknowledges what it forwarded; the next run takes the rest.

    Regression: the last PUBACKs of a run stopped while Mosquitto was still sending were lost
    (closing a socket with unread data sends a TCP RST) and came again as duplicates.
    """
    root = f"r{uuid.uuid4().hex[:10]}"
    host, port = _address()
    url = f"mqtt://{host}:{port}/{root}/sensors/+/temp?client_id={root}&session_expiry_s=60"
    publishers = _Publishers(root, publishers=2, per_sensor=150, rate_per_s=1000)
    with connect(f"sqlite:///{tmp_path / 'q.db'}") as broker:
        first = MqttBridge(MqttBridgeConfig.from_url(url), broker, "sensors")
        first.start(max_messages=200)
        try:
            publishers.start()
            assert first.wait(DEADLINE_S)
        finally:
            assert first.stop().forwarded == 200
        acked = publishers.join()
        second = MqttBridge(MqttBridgeConfig.from_url(url), broker, "sensors")
        second.start(max_messages=publishers.total - 200)
        try:
            assert second.wait(DEADLINE_S), f"the second run forwarded {second.stats.forwarded}"
        finally:
            second.stop()
        collector = _Collector(broker, "sensors")
        collector.until(lambda: len(collector.deliveries) >= publishers.total, "every message")
        collector.drain()
        collector.consumer.close()
    counts = collector.counts()
    assert set(counts) == acked and len(acked) == publishers.total
    assert max(counts.values()) == 1, f"duplicates: {[k for k, n in counts.items() if n > 1][:5]}"


@pytest.mark.needs_broker("mosquitto")
def test_retained_flag_and_user_properties_become_headers() -> None:
    root = f"p{uuid.uuid4().hex[:10]}"
    host, port = _address()
    retained_topic, live_topic = f"{root}/sensors/a/temp", f"{root}/sensors/b/temp"
    publisher = _client(f"{root}-pub", mqtt.MQTTv5)
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("msg-id", "r-1")]
        publisher.publish(retained_topic, b"retained", qos=1, retain=True, properties=props).wait_for_publish(
            10
        )
        url = f"mqtt://{host}:{port}/{root}/sensors/+/temp?client_id={root}&session_expiry_s=10"
        with connect("memory://") as broker:
            bridge = MqttBridge(MqttBridgeConfig.from_url(url), broker, "sensors")
            bridge.start(max_messages=2)
            try:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = [("msg-id", "n-1")]
                publisher.publish(live_topic, b"live", qos=1, properties=props).wait_for_publish(10)
                assert bridge.wait(DEADLINE_S)
            finally:
                bridge.stop()
            collector = _Collector(broker, "sensors")
            collector.until(lambda: len(collector.deliveries) >= 2, "both messages")
            collector.consumer.close()
            got = {d.payload: dict(d.headers) for d in collector.deliveries}
    finally:
        publisher.publish(retained_topic, b"", qos=1, retain=True).wait_for_publish(10)  # clears it
        _close(publisher)
    assert got == {
        b"retained": {
            HEADER_TOPIC: retained_topic,
            HEADER_QOS: "1",
            HEADER_RETAIN: "true",
            "mqtt-user-msg-id": "r-1",
        },
        b"live": {
            HEADER_TOPIC: live_topic,
            HEADER_QOS: "1",
            HEADER_RETAIN: "false",
            "mqtt-user-msg-id": "n-1",
        },
    }


@pytest.mark.slow
@pytest.mark.needs_broker("mosquitto")
def test_mosquitto_restart_is_survived_and_counted_as_a_lost_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The harness runs Mosquitto with ``persistence false``: a restart forgets every session.

    The bridge reconnects by itself, subscribes again, says the session was lost, and goes on.
    """
    root = f"m{uuid.uuid4().hex[:10]}"
    host, port = _address()
    url = f"mqtt://{host}:{port}/{root}/#?client_id={root}&session_expiry_s=60"
    with connect("memory://") as broker:
        bridge = MqttBridge(MqttBridgeConfig.from_url(url), broker, "sensors")
        bridge.start(max_messages=1)
        try:
            before = running_brokers()["mosquitto"]["pids"]
            result = subprocess.run(
                [str(ROOT / "scripts" / "brokers"), "restart", "mosquitto"],
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert running_brokers()["mosquitto"]["pids"] != before, "Mosquitto was not restarted"
            # Publish until the bridge is back: what Mosquitto accepts before the bridge has
            # subscribed again matches no subscription and is gone (no session survived).
            publisher = _client(f"{root}-pub")
            try:
                deadline = time.monotonic() + DEADLINE_S
                while not bridge.wait(0.2):
                    assert time.monotonic() < deadline, f"the bridge did not come back: {bridge.stats}"
                    publisher.publish(f"{root}/after", b"after the restart", qos=1).wait_for_publish(5)
            finally:
                _close(publisher)
        finally:
            stats = bridge.stop()
    assert (stats.forwarded, stats.reconnects, stats.sessions_lost) == (1, 1, 1)
    assert "kept no session" in caplog.text
