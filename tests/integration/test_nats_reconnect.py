"""nats-server is SIGKILLed and started again while a producer and a consumer run.

``scripts/brokers restart nats`` kills the server with SIGKILL and starts it again on the same
ports and JetStream store. The producer counts a message as acknowledged when ``publish_many``
returned (JetStream acked it); every such message must reach the consumer after recovery
(duplicates are allowed: delivery is at-least-once). A second test stops the server for longer
than the retry bound: the operation raises BrokerConnectionError naming the URL, and the same
broker object works again once the server is back.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import BrokerConnectionError, LeaseLostError
from infeed.types import Delivery
from tests.support import ROOT, broker_url, running_brokers

BATCH = 50
#: Few retries, soon over: for the test of the bound.
SHORT = "reconnect_attempts=3&reconnect_backoff_s=0.05&reconnect_backoff_max_s=0.2&request_timeout_s=1"
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


def _url(options: str = OPTIONS) -> str:
    base = broker_url("nats")
    return f"{base}{'&' if '?' in base else '?'}{options}"


def _brokers(verb: str) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "brokers"), verb, "nats"],
        capture_output=True,
        text=True,
        timeout=RECOVERY_S,
        check=False,
    )
    assert result.returncode == 0, f"scripts/brokers {verb} nats failed: {result.stderr}"


def _restart() -> None:
    """SIGKILL the server and start it again; check it really is a new process."""
    before = running_brokers()["nats"]["pids"]
    _brokers("restart")
    assert running_brokers()["nats"]["pids"] != before, "the server was not restarted"


def _wait_for(condition: Callable[[], bool], what: str, cond: threading.Condition) -> None:
    deadline = time.monotonic() + RECOVERY_S
    with cond:
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {what}")
            cond.wait(remaining)


@pytest.mark.slow
@pytest.mark.needs_broker("nats")
@pytest.mark.timeout(300)
def test_server_kill_mid_stream_loses_nothing_acknowledged() -> None:
    url = _url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    producer.create_topic(topic, partitions=2)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish

    cond = threading.Condition()
    acked: set[int] = set()
    received: set[int] = set()
    stop = threading.Event()
    done = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            ids = list(range(n, n + BATCH))
            producer.publish_many(topic, [str(i).encode() for i in ids])
            n += BATCH
            with cond:
                acked.update(ids)
                cond.notify_all()

    def consume() -> None:
        while not done.is_set():
            batch = consumer.receive(max_messages=200, timeout_s=0.2)
            if not batch:
                continue
            try:
                consumer.ack(batch)
            except LeaseLostError:
                pass  # settled too late around the restart: delivered again, counted then
            with cond:
                received.update(int(d.payload) for d in batch)
                cond.notify_all()

    workers = [_Worker(produce), _Worker(consume)]
    for w in workers:
        w.start()
    try:
        _wait_for(lambda: len(received) >= 500, "messages to flow before the kill", cond)
        _restart()
        with cond:
            mark = len(acked)
        _wait_for(lambda: len(acked) >= mark + 500, "the producer to publish after the restart", cond)
        stop.set()
        workers[0].join(RECOVERY_S)
        assert workers[0].error is None, f"producer failed: {workers[0].error!r}"
        _wait_for(lambda: acked <= received, "every acknowledged message to arrive", cond)
        done.set()
        workers[1].join(RECOVERY_S)
        assert workers[1].error is None, f"consumer failed: {workers[1].error!r}"
        assert not acked - received
        assert len(acked) >= mark + 500
    finally:
        stop.set()
        done.set()
        for w in workers:
            w.join(RECOVERY_S)
        consumer.close()
        producer.delete_topic(topic)
        consumer_broker.close()
        producer.close()


@pytest.mark.slow
@pytest.mark.needs_broker("nats")
@pytest.mark.timeout(300)
def test_retries_are_bounded_and_the_broker_object_recovers_afterwards() -> None:
    url = _url(
        "reconnect_attempts=3&reconnect_backoff_s=0.05&reconnect_backoff_max_s=0.2&request_timeout_s=1"
    )
    topic = f"bounded-{uuid.uuid4().hex[:10]}"
    broker = connect(url)
    try:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        _brokers("kill")
        try:
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError, match=url.split("?")[0]):
                broker.publish(topic, b"lost")
            assert time.monotonic() - started < 30, "the bound on retries did not hold"
            with pytest.raises(BrokerConnectionError):
                consumer.receive(max_messages=1, timeout_s=0.1)
        finally:
            _brokers("restart")
        deadline = time.monotonic() + RECOVERY_S
        while True:  # the connection comes back in the background, backing off
            try:
                broker.publish(topic, b"after")
                break
            except BrokerConnectionError:
                if time.monotonic() > deadline:
                    raise
        got: list[Delivery] = []
        while not got and time.monotonic() < deadline:
            got = consumer.receive(max_messages=10, timeout_s=1.0)
        assert [d.payload for d in got] == [b"after"]
        consumer.ack(got)
        broker.delete_topic(topic)
    finally:
        broker.close()
