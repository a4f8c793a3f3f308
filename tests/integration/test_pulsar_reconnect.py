"""Pulsar is SIGKILLed and started again while a producer and a consumer run: nothing acked is lost.

``scripts/brokers restart pulsar`` kills the standalone (broker, bookie and metadata store in one
JVM) with SIGKILL, removes the ephemeral metadata nodes the killed process left (its locks, which
the next launch would otherwise race with: scripts/harness/pulsar.py) and starts it again on the
same ports and data directory; that takes 15-30 s here. The producer counts a
message as acknowledged when ``publish_many`` returned; every such message must reach the consumer
after recovery (duplicates are allowed: at-least-once). A consumer blocked in ``receive`` through
the kill gets what is published after it. Committed positions must survive the restart, and a
seek to a position written before it (in a ledger the restart closed) must replay from there.
One restart only: each one costs 15-30 s of a 2-core machine, so Pulsar has this one test, on the
broker-kill suite's ``Entry`` (test_reconnect.py), rather than that suite's two.
"""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import quote

import pytest

from infeed.brokers import Broker, connect
from infeed.errors import LeaseLostError
from infeed.types import Delivery, Position
from tests.integration.test_reconnect import Entry, Worker
from tests.support import broker_url, running_brokers

BATCH = 100
#: The suite's entry for Pulsar: seconds to come back and catch up, and for the restart itself (it
#: may stop and launch again).
PULSAR = Entry(
    "pulsar",
    "reconnect_attempts=40&reconnect_backoff_s=0.05&reconnect_backoff_max_s=1"
    "&ack_timeout_s=3&send_timeout_s=10&operation_timeout_s=10",
    recovery_s=120.0,
    timeout_s=600,
    restart_s=240.0,
    base_url=lambda: f"{broker_url('pulsar')}?admin_url={quote(broker_url('pulsar', 'admin'), safe='')}",
)
RECOVERY_S = PULSAR.recovery_s


def _log_hint() -> str:
    """Where the broker's log is, for a failure message (``stop`` removes it unless told not to)."""
    log = running_brokers()["pulsar"].get("log")
    return f" (broker log: {log}; INFEED_BROKERS_KEEP=1 scripts/brokers stop keeps it)"


def _ids(payloads: list[bytes]) -> list[int]:
    return [int(p.split(b":", 1)[0]) for p in payloads]


@pytest.mark.slow
@pytest.mark.needs_broker("pulsar")
@pytest.mark.timeout(PULSAR.timeout_s)
def test_broker_kill_mid_stream_loses_nothing_acknowledged() -> None:
    url = PULSAR.url()
    topic = f"reconnect-{uuid.uuid4().hex[:10]}"
    producer: Broker = connect(url)
    consumer_broker: Broker = connect(url)
    producer.create_topic(topic, partitions=2)
    consumer = consumer_broker.subscribe(topic, group="g")  # the group exists before the first publish
    early = producer.subscribe(topic, group="replay", partitions=[0])
    quiet = f"{topic}-quiet"
    idle = consumer_broker.subscribe(quiet, group="g")  # blocked in receive on an empty topic
    idle_got: list[bytes] = []
    idle_waiting = threading.Event()

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
                with lock:  # publish_many returned: every send has the broker's receipt
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
                pass  # the connection dropped under the lease: another delivery follows
            with lock:
                received.update(_ids([d.payload for d in batch]))
                lock.notify_all()

    def wait_for_one() -> None:
        deadline = time.monotonic() + 2 * RECOVERY_S
        while not idle_got and time.monotonic() < deadline:
            idle_waiting.set()
            idle_got.extend(d.payload for d in idle.receive(max_messages=10, timeout_s=1.0))

    workers = [Worker(produce), Worker(consume), Worker(wait_for_one)]
    for w in workers:
        w.start()
    consuming = workers[1]
    try:
        with lock:  # mid-stream: both sides are moving before the kill
            assert lock.wait_for(lambda: len(received) >= 500 and len(acked) >= 1000, timeout=60), (
                f"no traffic before the kill: acked {len(acked)}, received {len(received)}"
            )
        before: list[Delivery] = []  # positions in the ledger the kill closes
        while len(before) < 5:
            batch = early.receive(max_messages=5 - len(before), timeout_s=10)
            assert batch, "nothing on partition 0 before the kill"
            before.extend(batch)
        early.commit(before[2].next_position)
        assert idle_waiting.wait(10)
        PULSAR.restart()  # kills the broker under the producer, the consumer and the blocked receive
        restarted.set()
        assert published_after_restart.wait(RECOVERY_S), f"the producer did not recover{_log_hint()}"
        producer.publish(quiet, b"after the restart")
        stop.set()
        deadline = time.monotonic() + RECOVERY_S
        with lock:
            while not (produced_all.is_set() and received >= acked) and consuming.is_alive():
                assert time.monotonic() < deadline, (
                    f"{len(acked - received)} acknowledged messages never arrived{_log_hint()}"
                )
                lock.wait(1.0)
        for w in workers:
            w.join(RECOVERY_S)
            if w.error is not None:
                raise AssertionError(f"{w.name} failed") from w.error
        assert received >= acked
        assert idle_got == [b"after the restart"], "the consumer waiting through the kill got nothing"

        # the subscription property that holds the commit outlived the broker process
        assert early.committed() == {0: Position(topic, 0, before[2].next_position.offset)}
        # seek back into the ledger the kill closed: replay from there, in partition order
        early.seek(before[1].position)
        replay: list[Delivery] = []
        while len(replay) < 4:
            batch = early.receive(max_messages=4 - len(replay), timeout_s=20)
            assert batch, f"the seek replayed {len(replay)} of 4 messages"
            replay.extend(batch)
        assert [d.payload for d in replay] == [d.payload for d in before[1:5]]
        assert [d.position for d in replay] == [d.position for d in before[1:5]]
        assert producer.describe_topic(topic).depth >= len(acked)
    finally:
        stop.set()
        for w in workers:
            w.join(RECOVERY_S)
        consumer.close()
        early.close()
        idle.close()
        producer.delete_topic(topic)
        producer.delete_topic(quiet)
        consumer_broker.close()
        producer.close()
