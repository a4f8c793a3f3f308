"""Redis is SIGKILLed and started again while a producer and a consumer run: nothing acked is lost.

``scripts/brokers restart redis`` kills the server with SIGKILL and starts it again on the same
port and data directory (AOF on, ``appendfsync always``). The producer counts a message as
acknowledged when ``publish_many`` returned; every such message must reach the consumer after
recovery (duplicates are allowed: delivery is at-least-once).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import LeaseLostError
from tests.support import ROOT, broker_url, running_brokers

BATCH = 100
#: Seconds to wait for the server to come back and the consumer to catch up.
RECOVERY_S = 60.0
OPTIONS = "reconnect_attempts=30&reconnect_backoff_s=0.05&reconnect_backoff_max_s=1&ack_timeout_s=3"


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
    base = broker_url("redis")
    return f"{base}{'&' if '?' in base else '?'}{OPTIONS}"


def _restart() -> None:
    """SIGKILL the server and start it again; check it really is a new process."""
    before = running_brokers()["redis"]["pids"]
    result = subprocess.run(
        [str(ROOT / "scripts" / "brokers"), "restart", "redis"],
        capture_output=True,
        text=True,
        timeout=RECOVERY_S,
        check=False,
    )
    assert result.returncode == 0, f"restart failed: {result.stderr}"
    assert running_brokers()["redis"]["pids"] != before, "the server was not restarted"


@pytest.mark.slow
@pytest.mark.needs_broker("redis")
@pytest.mark.timeout(240)
def test_server_kill_mid_stream_loses_nothing_acknowledged() -> None:
    url = _url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    producer.create_topic(topic, partitions=2)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish

    lock = threading.Condition()
    acked: set[int] = set()
    received: set[int] = set()
    stop = threading.Event()
    produced_all = threading.Event()
    restarted = threading.Event()
    published_after_restart = threading.Event()

    def produce() -> None:
        n = 0
        try:
            while not stop.is_set():
                producer.publish_many(topic, [f"{i}:".encode() + b"x" * 1000 for i in range(n, n + BATCH)])
                with lock:  # publish_many returned: the server holds them (AOF, fsync always)
                    acked.update(range(n, n + BATCH))
                    lock.notify_all()
                if restarted.is_set():
                    published_after_restart.set()
                n += BATCH
        finally:
            produced_all.set()

    def caught_up() -> bool:
        with lock:
            return received >= acked

    def consume() -> None:
        while not (produced_all.is_set() and caught_up()):
            batch = consumer.receive(max_messages=200, timeout_s=0.5)
            if not batch:
                continue
            try:
                consumer.ack(batch)
            except LeaseLostError:
                pass  # held across the outage past ack_timeout_s: another delivery follows
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
        _restart()
        restarted.set()
        assert published_after_restart.wait(RECOVERY_S), "the producer did not recover"
        stop.set()
        deadline = time.monotonic() + RECOVERY_S
        with lock:
            while not (produced_all.is_set() and received >= acked) and consuming.is_alive():
                assert time.monotonic() < deadline, (
                    f"{len(acked - received)} acknowledged messages never arrived"
                )
                lock.wait(1.0)
        for w in workers:
            w.join(RECOVERY_S)
            if w.error is not None:
                raise AssertionError(f"{w.name} failed") from w.error
        assert received >= acked
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
@pytest.mark.needs_broker("redis")
@pytest.mark.timeout(120)
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
            got.extend(d.payload for d in consumer.receive(max_messages=10, timeout_s=1.0))

    worker = _Worker(wait_for_one)
    worker.start()
    try:
        assert waiting.wait(10)
        _restart()  # kills the server under the blocked XREADGROUP
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
