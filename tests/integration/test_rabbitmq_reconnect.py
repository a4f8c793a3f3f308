"""RabbitMQ is SIGKILLed and started again while a producer and a consumer run: nothing acked is lost.

The broker is killed and restarted on the same ports and data by ``scripts/brokers restart
rabbitmq`` (SIGKILL; the node then rebuilds its message store, ~20 s). The producer counts a
message as acknowledged when ``publish_many`` returned; every such message must reach the
consumer after recovery (duplicates are allowed: delivery is at-least-once). The kill comes a
few seconds after the group's queues were declared, often within the ~3 s in which RabbitMQ 3.10
would lose a new quorum queue (see ``_rabbitmq_recovery``).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import LeaseLostError
from tests.support import ROOT, broker_url

BATCH = 50
#: Seconds to wait for the broker to come back and the consumer to catch up.
RECOVERY_S = 180.0
#: Short pauses between many reconnect attempts (up to ~150 s in all): the clients come back as
#: soon as the node listens, while it is still restarting its queues and streams, which is the
#: moment the backend has to handle. Generous timeouts: confirms wait for that recovery.
OPTIONS = (
    "reconnect_attempts=600&reconnect_backoff_s=0.05&reconnect_backoff_max_s=0.25"
    "&ack_timeout_s=60&timeout_s=120"
)


def _ids(payloads: list[bytes]) -> list[int]:
    return [int(p.split(b":", 1)[0]) for p in payloads]


class _Worker(threading.Thread):
    def __init__(self, target: object) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None
        self._fn = target

    def run(self) -> None:
        try:
            self._fn()  # type: ignore[operator]
        except BaseException as exc:
            self.error = exc


@pytest.mark.slow
@pytest.mark.needs_broker("rabbitmq")
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "queue_type",
    ["classic", "quorum", "stream"],
)
def test_broker_kill_mid_stream_loses_nothing_acknowledged(queue_type: str) -> None:
    base = broker_url("rabbitmq")
    url = f"{base}{'&' if '?' in base else '?'}{OPTIONS}&queue_type={queue_type}"
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish

    lock = threading.Condition()
    acked: set[int] = set()
    received: set[int] = set()
    stop = threading.Event()
    published_after_restart = threading.Event()
    restarted = threading.Event()
    producer_done = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            batch = [f"{i}:".encode() + b"x" * 1000 for i in range(n, n + BATCH)]
            producer.publish_many(topic, batch)  # returns once RabbitMQ confirmed every message
            with lock:
                acked.update(range(n, n + BATCH))
                lock.notify_all()
            if restarted.is_set():
                published_after_restart.set()
            n += BATCH

    def caught_up() -> bool:
        with lock:
            return received >= acked

    def consume() -> None:
        while not (producer_done.is_set() and caught_up()):
            batch = consumer.receive(max_messages=200, timeout_s=0.5)
            if not batch:
                continue
            try:
                consumer.ack(batch)
            except LeaseLostError:
                pass  # the connection dropped after receive: RabbitMQ delivers them again
            with lock:
                received.update(_ids([d.payload for d in batch]))
                lock.notify_all()

    workers = [_Worker(produce), _Worker(consume)]
    for w in workers:
        w.start()
    try:
        with lock:  # mid-stream: both sides are moving before the kill
            assert lock.wait_for(lambda: len(received) >= 500 and len(acked) >= 1000, timeout=60), (
                f"no traffic before the kill: acked {len(acked)}, received {len(received)}"
            )
        result = subprocess.run(
            [str(ROOT / "scripts" / "brokers"), "restart", "rabbitmq"],
            capture_output=True,
            text=True,
            timeout=RECOVERY_S,
            check=False,
        )
        assert result.returncode == 0, f"restart failed: {result.stderr}"
        restarted.set()
        assert published_after_restart.wait(RECOVERY_S), "the producer did not recover"
        stop.set()
        workers[0].join(RECOVERY_S)  # its last batch counts only once publish_many returned
        producer_done.set()
        deadline = time.monotonic() + RECOVERY_S
        with lock:
            while not received >= acked and workers[1].is_alive():  # the consumer is still going
                assert time.monotonic() < deadline, (
                    f"{len(acked - received)} acknowledged messages never arrived"
                )
                lock.wait(1.0)
        for w in workers:
            w.join(RECOVERY_S)
            if w.error is not None:
                raise AssertionError(f"{w.name} failed") from w.error
        missing = acked - received
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        assert len(acked) > 1000
    finally:
        stop.set()
        producer_done.set()
        for w in workers:
            w.join(30)
        consumer.close()
        consumer_broker.close()
        producer.close()
