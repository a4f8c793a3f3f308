"""Kafka is SIGKILLed and started again while a producer and a consumer run: nothing acked is lost.

``scripts/brokers restart kafka`` kills the single KRaft node with SIGKILL and starts it again on
the same ports and data directory. The producer counts a message as acknowledged when
``publish_many`` returned (idempotent producer, ``acks=all``); every such message must reach the
consumer after recovery. Duplicates are allowed (acks written just before the kill come back) and
counted.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import LeaseLostError
from tests.support import ROOT, broker_url, running_brokers

BATCH = 100
#: Seconds to wait for the broker to come back and the consumer to catch up.
RECOVERY_S = 120.0
OPTIONS = "&".join(
    [
        "reconnect_attempts=40",
        "reconnect_backoff_s=0.1",
        "reconnect_backoff_max_s=2",
        "ack_timeout_s=5",
        "session_timeout_s=6",
    ]
)


class _Worker(threading.Thread):
    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None
        self._fn = fn

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:
            self.error = exc


def _url() -> str:
    base = broker_url("kafka")
    return f"{base}{'&' if '?' in base else '?'}{OPTIONS}"


def _restart() -> float:
    """SIGKILL the node and start it again; check it really is a new process. Returns seconds."""
    before = running_brokers()["kafka"]["pids"]
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "brokers"), "restart", "kafka"],
        capture_output=True,
        text=True,
        timeout=RECOVERY_S,
        check=False,
    )
    assert result.returncode == 0, f"restart failed: {result.stderr}"
    assert running_brokers()["kafka"]["pids"] != before, "the broker was not restarted"
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.needs_broker("kafka")
@pytest.mark.timeout(360)
def test_broker_kill_mid_stream_loses_nothing_acknowledged() -> None:
    url = _url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    producer.create_topic(topic, partitions=2)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish

    lock = threading.Condition()
    acked: set[int] = set()
    received: Counter[int] = Counter()
    stop = threading.Event()
    produced_all = threading.Event()
    restarted = threading.Event()
    published_after_restart = threading.Event()

    def produce() -> None:
        n = 0
        try:
            while not stop.is_set():
                producer.publish_many(topic, [f"{i}:".encode() + b"x" * 1000 for i in range(n, n + BATCH)])
                with lock:  # publish_many returned: the broker holds them (acks=all)
                    acked.update(range(n, n + BATCH))
                    lock.notify_all()
                if restarted.is_set():
                    published_after_restart.set()
                n += BATCH
        finally:
            produced_all.set()

    def caught_up() -> bool:
        with lock:
            return acked <= received.keys()

    def consume() -> None:
        while not (produced_all.is_set() and caught_up()):
            batch = consumer.receive(max_messages=200, timeout_s=0.5)
            if not batch:
                continue
            try:
                consumer.ack(batch)
            except LeaseLostError:
                pass  # a rebalance after the restart took the partition: another delivery follows
            with lock:
                received.update(int(d.payload.split(b":", 1)[0]) for d in batch)
                lock.notify_all()

    workers = [_Worker(produce), _Worker(consume)]
    for w in workers:
        w.start()
    consuming = workers[1]
    try:
        with lock:  # mid-stream: both sides are moving before the kill
            assert lock.wait_for(lambda: len(received) >= 500 and len(acked) >= 1000, timeout=60), (
                f"no traffic before the kill: acked {len(acked)}, received {len(received)}"
            )
        down_s = _restart()
        restarted.set()
        assert published_after_restart.wait(RECOVERY_S), "the producer did not recover"
        stop.set()
        deadline = time.monotonic() + RECOVERY_S
        with lock:
            while not (produced_all.is_set() and acked <= received.keys()) and consuming.is_alive():
                assert time.monotonic() < deadline, (
                    f"{len(acked - received.keys())} acknowledged messages never arrived"
                )
                lock.wait(1.0)
        for w in workers:
            w.join(RECOVERY_S)
            if w.error is not None:
                raise AssertionError(f"{w.name} failed") from w.error
        assert acked <= received.keys()
        duplicates = sum(n - 1 for n in received.values())
        print(
            f"kafka restart took {down_s:.1f} s; {len(acked)} acknowledged, 0 lost, {duplicates} duplicates"
        )
        info = producer.describe_topic(topic)
        assert info.depth >= len(acked)
    finally:
        stop.set()
        for w in workers:
            w.join(RECOVERY_S)
        consumer.close()
        producer.delete_topic(topic)
        consumer_broker.close()
        producer.close()


@pytest.mark.slow
@pytest.mark.needs_broker("kafka")
@pytest.mark.timeout(240)
def test_waiting_consumer_survives_the_kill() -> None:
    url = _url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    broker = connect(url)
    consumer = broker.subscribe(topic, group="g")
    got: list[bytes] = []
    waiting = threading.Event()

    def wait_for_one() -> None:
        deadline = time.monotonic() + RECOVERY_S
        while not got and time.monotonic() < deadline:
            waiting.set()
            batch = consumer.receive(max_messages=10, timeout_s=1.0)
            consumer.ack(batch)
            got.extend(d.payload for d in batch)

    worker = _Worker(wait_for_one)
    worker.start()
    try:
        assert waiting.wait(10)
        _restart()  # kills the node under the waiting consume()
        broker.publish(topic, b"after the restart")
        worker.join(RECOVERY_S)
        if worker.error is not None:
            raise AssertionError("the waiting consumer failed") from worker.error
        assert got == [b"after the restart"]
    finally:
        worker.join(RECOVERY_S)
        consumer.close()
        broker.delete_topic(topic)
        broker.close()
