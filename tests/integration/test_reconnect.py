"""A broker is SIGKILLed and started again while a producer and a consumer run: nothing acked is lost.

``scripts/brokers restart NAME`` kills the broker with SIGKILL and starts it again on the same
ports and data: Redis (AOF on, ``appendfsync always``), the single KRaft Kafka node, nats-server
with its JetStream store, RabbitMQ (the node then rebuilds its message store, ~20 s). The producer
counts a message as acknowledged when ``publish_many`` returned; every such message must reach the
consumer after recovery. Duplicates are allowed (delivery is at-least-once) and counted.

One ``Entry`` per broker (and per RabbitMQ ``queue_type``) says how to reach it and what it
promises beyond that; a backend joins the suite as one more entry in ``ENTRIES``.

For RabbitMQ the kill comes a few seconds after the group's queues were declared, often within
the ~3 s in which RabbitMQ 3.10 would lose a new quorum queue (see ``_rabbitmq_recovery``).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import BrokerConnectionError, LeaseLostError
from infeed.types import Delivery
from tests.support import ROOT, broker_url, running_brokers

#: Messages per ``publish_many``.
BATCH = 50
#: Messages the producer must get acknowledged after the restart.
AFTER_RESTART = 500


@dataclass(frozen=True)
class Entry:
    """One broker under test: how to reach it, and how long it may take to come back."""

    #: the broker's name in scripts/brokers (and the test id's start)
    name: str
    #: URL options: reconnect bounds and timeouts that fit this broker's recovery
    options: str
    #: seconds for the broker to come back and the consumer to catch up
    recovery_s: float
    #: pytest timeout of the mid-stream test
    timeout_s: int
    #: seconds ``scripts/brokers restart`` may take (defaults to ``recovery_s``)
    restart_s: float | None = None
    #: test id (defaults to ``name``)
    id: str = ""
    #: create the topic with this many partitions first (None: ``subscribe`` creates it)
    partitions: int | None = 2
    #: ``describe_topic`` depth counts every acknowledged message after recovery
    depth_holds_all: bool = True
    #: delete the topic at the end
    delete_topic: bool = True
    #: pytest timeout of the test of a consumer blocked in ``receive`` through the kill (None:
    #: that test does not run for this broker)
    waiting_timeout_s: int | None = None
    #: the URL before the options (defaults to the harness's ``url`` of ``name``)
    base_url: Callable[[], str] | None = None

    def url(self, options: str | None = None) -> str:
        base = self.base_url() if self.base_url is not None else broker_url(self.name)
        return f"{base}{'&' if '?' in base else '?'}{self.options if options is None else options}"

    def brokers(self, verb: str) -> None:
        """Run ``scripts/brokers VERB NAME``."""
        result = subprocess.run(
            [str(ROOT / "scripts" / "brokers"), verb, self.name],
            capture_output=True,
            text=True,
            timeout=self.restart_s or self.recovery_s,
            check=False,
        )
        assert result.returncode == 0, f"scripts/brokers {verb} {self.name} failed: {result.stderr}"

    def restart(self) -> float:
        """SIGKILL the broker and start it again; check it really is a new process. Returns seconds."""
        before = running_brokers()[self.name]["pids"]
        started = time.monotonic()
        self.brokers("restart")
        assert running_brokers()[self.name]["pids"] != before, "the broker was not restarted"
        return time.monotonic() - started


#: Short pauses between many reconnect attempts (up to ~150 s in all): the clients come back as
#: soon as the node listens, while it is still restarting its queues and streams, which is the
#: moment the backend has to handle. Generous timeouts: confirms wait for that recovery.
_RABBITMQ = (
    "reconnect_attempts=600&reconnect_backoff_s=0.05&reconnect_backoff_max_s=0.25"
    "&ack_timeout_s=60&timeout_s=120"
)
ENTRIES = [
    Entry(
        "redis",
        "reconnect_attempts=30&reconnect_backoff_s=0.05&reconnect_backoff_max_s=1&ack_timeout_s=3",
        recovery_s=60.0,
        timeout_s=240,
        waiting_timeout_s=120,
    ),
    Entry(
        "kafka",
        "reconnect_attempts=40&reconnect_backoff_s=0.1&reconnect_backoff_max_s=2"
        "&ack_timeout_s=5&session_timeout_s=6",
        recovery_s=120.0,
        timeout_s=360,
        waiting_timeout_s=240,
    ),
    Entry(
        "nats",
        "reconnect_attempts=30&reconnect_backoff_s=0.05&reconnect_backoff_max_s=1&ack_timeout_s=3",
        recovery_s=60.0,
        timeout_s=300,
        depth_holds_all=False,
    ),
    *(
        Entry(
            "rabbitmq",
            f"{_RABBITMQ}&queue_type={queue_type}",
            recovery_s=180.0,
            timeout_s=400,
            id=f"rabbitmq-{queue_type}",
            partitions=None,
            depth_holds_all=False,
            delete_topic=False,
        )
        for queue_type in ("classic", "quorum", "stream")
    ),
]


def _params(entries: list[tuple[Entry, int]]) -> list[Any]:
    """Each entry as a test parameter with its broker and its pytest timeout."""
    return [
        pytest.param(e, id=e.id or e.name, marks=[pytest.mark.needs_broker(e.name), pytest.mark.timeout(t)])
        for e, t in entries
    ]


class Worker(threading.Thread):
    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None
        self._fn = fn

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:
            self.error = exc


def _id(payload: bytes) -> int:
    return int(payload.split(b":", 1)[0])


@pytest.mark.slow
@pytest.mark.parametrize("entry", _params([(e, e.timeout_s) for e in ENTRIES]))
def test_broker_kill_mid_stream_loses_nothing_acknowledged(entry: Entry) -> None:
    url = entry.url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    if entry.partitions is not None:
        producer.create_topic(topic, partitions=entry.partitions)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish

    lock = threading.Condition()
    acked: set[int] = set()
    received: Counter[int] = Counter()
    stop = threading.Event()
    producer_done = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            producer.publish_many(topic, [f"{i}:".encode() + b"x" * 1000 for i in range(n, n + BATCH)])
            with lock:  # publish_many returned: the broker holds them
                acked.update(range(n, n + BATCH))
                lock.notify_all()
            n += BATCH

    def caught_up() -> bool:
        with lock:
            return acked <= received.keys()

    def consume() -> None:
        while not (producer_done.is_set() and caught_up()):
            batch = consumer.receive(max_messages=200, timeout_s=0.5)
            if not batch:
                continue
            try:
                consumer.ack(batch)
            except LeaseLostError:
                pass  # settled too late around the restart (lease expired, rebalance): delivered again
            with lock:
                received.update(_id(d.payload) for d in batch)
                lock.notify_all()

    workers = [Worker(produce), Worker(consume)]
    for w in workers:
        w.start()
    producing, consuming = workers
    try:
        with lock:  # mid-stream: both sides are moving before the kill
            assert lock.wait_for(lambda: len(received) >= 500 and len(acked) >= 1000, timeout=60), (
                f"no traffic before the kill: acked {len(acked)}, received {len(received)}"
            )
        down_s = entry.restart()
        with lock:
            mark = len(acked)
            recovered = lock.wait_for(lambda: len(acked) >= mark + AFTER_RESTART, timeout=entry.recovery_s)
            assert recovered, f"the producer did not recover: {producing.error!r}"
        stop.set()
        producing.join(entry.recovery_s)  # its last batch counts only once publish_many returned
        producer_done.set()
        deadline = time.monotonic() + entry.recovery_s
        with lock:
            while not acked <= received.keys() and consuming.is_alive():  # the consumer is still going
                assert time.monotonic() < deadline, (
                    f"{len(acked - received.keys())} acknowledged messages never arrived"
                )
                lock.wait(1.0)
        for w in workers:
            w.join(entry.recovery_s)
            if w.error is not None:
                raise AssertionError(f"{w.name} failed") from w.error
        missing = acked - received.keys()
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        assert len(acked) >= mark + AFTER_RESTART
        assert len(acked) > 1000
        duplicates = sum(n - 1 for n in received.values())
        print(
            f"{entry.id or entry.name} restart took {down_s:.1f} s; {len(acked)} acknowledged, 0 lost, "
            f"{duplicates} duplicates"
        )
        if entry.depth_holds_all:
            assert producer.describe_topic(topic).depth >= len(acked)
    finally:
        stop.set()
        producer_done.set()
        for w in workers:
            w.join(entry.recovery_s)
        consumer.close()
        if entry.delete_topic:
            producer.delete_topic(topic)
        consumer_broker.close()
        producer.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry", _params([(e, e.waiting_timeout_s) for e in ENTRIES if e.waiting_timeout_s is not None])
)
def test_waiting_consumer_survives_the_kill(entry: Entry) -> None:
    broker = connect(entry.url())
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    consumer = broker.subscribe(topic, group="g")
    got: list[bytes] = []
    waiting = threading.Event()

    def wait_for_one() -> None:
        deadline = time.monotonic() + entry.recovery_s
        while not got and time.monotonic() < deadline:
            waiting.set()
            batch = consumer.receive(max_messages=10, timeout_s=1.0)
            consumer.ack(batch)
            got.extend(d.payload for d in batch)

    worker = Worker(wait_for_one)
    worker.start()
    try:
        assert waiting.wait(10)
        entry.restart()  # kills the broker under the waiting receive
        broker.publish(topic, b"after the restart")
        worker.join(entry.recovery_s)
        if worker.error is not None:
            raise AssertionError("the waiting consumer failed") from worker.error
        assert got == [b"after the restart"]
    finally:
        worker.join(entry.recovery_s)
        consumer.close()
        broker.delete_topic(topic)
        broker.close()


NATS = next(e for e in ENTRIES if e.name == "nats")


@pytest.mark.slow
@pytest.mark.needs_broker("nats")
@pytest.mark.timeout(300)
def test_nats_retries_are_bounded_and_the_broker_object_recovers_afterwards() -> None:
    """nats-server stopped for longer than the retry bound: the operation raises
    BrokerConnectionError naming the URL, and the same broker object works again once it is back."""
    url = NATS.url(
        "reconnect_attempts=3&reconnect_backoff_s=0.05&reconnect_backoff_max_s=0.2&request_timeout_s=1"
    )
    topic = f"bounded-{uuid.uuid4().hex[:10]}"
    broker = connect(url)
    try:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        NATS.brokers("kill")
        try:
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError, match=url.split("?")[0]):
                broker.publish(topic, b"lost")
            assert time.monotonic() - started < 30, "the bound on retries did not hold"
            with pytest.raises(BrokerConnectionError):
                consumer.receive(max_messages=1, timeout_s=0.1)
        finally:
            NATS.brokers("restart")
        deadline = time.monotonic() + NATS.recovery_s
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
