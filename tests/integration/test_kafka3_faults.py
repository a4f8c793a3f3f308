"""Three Kafka nodes: the leader of a partition is SIGKILLed and restarted mid-produce.

The cluster from ``scripts/brokers start kafka3`` has replication factor 3 and
``min.insync.replicas=2``; infeed's producer is idempotent with ``acks=all``. A producer publishes
numbered messages while the node leading partition 0 is SIGKILLed (``harness.kafka.kill_node``)
and later started again on its data (``restart_node``). Then a fresh group reads the whole topic:
every message whose ``publish_many`` returned must be there (0 lost), and the idempotent
producer must not have written any message twice (duplicates are counted and must be 0).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka.admin import AdminClient

from infeed.brokers import connect
from infeed.errors import BrokerError
from tests.support import broker_url, harness, running_brokers

BATCH = 200
OPTIONS = "reconnect_attempts=30&reconnect_backoff_s=0.1&reconnect_backoff_max_s=2"
#: Seconds the producer keeps going with one node down.
OUTAGE_S = 10.0
#: Messages acknowledged before the kill, and again after the restart.
STRIDE = 3000


def _leader(bootstrap: str, topic: str, partition: int) -> int:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    return int(meta.topics[topic].partitions[partition].leader)


@pytest.mark.slow
@pytest.mark.needs_broker("kafka3")
@pytest.mark.timeout(600)
# restart_node drops the Popen of the node it started (the node outlives it on purpose)
@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_leader_kill_during_acks_all_produce_loses_and_duplicates_nothing() -> None:
    base = broker_url("kafka3")
    url = f"{base}{'&' if '?' in base else '?'}{OPTIONS}"
    kafka_harness = harness("kafka")
    state = running_brokers()["kafka3"]
    topic = f"faults-{uuid.uuid4().hex[:10]}"
    broker = connect(url)
    broker.create_topic(topic, partitions=3)

    lock = threading.Condition()
    acked: set[int] = set()
    failed: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            try:
                broker.publish_many(topic, [f"{i}:".encode() + b"x" * 1000 for i in range(n, n + BATCH)])
            except BrokerError as exc:  # not acknowledged: it may or may not be there, never twice
                failed.append(exc)
            else:
                with lock:
                    acked.update(range(n, n + BATCH))
                    lock.notify_all()
            n += BATCH

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        with lock:
            assert lock.wait_for(lambda: len(acked) >= STRIDE, timeout=120), "no traffic before the kill"
        victim = _leader(state["urls"]["bootstrap"], topic, 0) - 1  # node.id is index + 1
        kafka_harness.kill_node(state, victim)
        killed_at = time.monotonic()
        with lock:
            before = len(acked)
            lock.wait_for(lambda: time.monotonic() - killed_at > OUTAGE_S, timeout=OUTAGE_S + 1)
            during = len(acked) - before
        kafka_harness.restart_node(state, victim)
        with lock:
            mark = len(acked)
            assert lock.wait_for(lambda: len(acked) >= mark + STRIDE, timeout=180), "no traffic after restart"
        stop.set()
        producer.join(120)
        assert not producer.is_alive(), "the producer hung"

        consumer = broker.subscribe(topic, group=f"audit-{uuid.uuid4().hex[:6]}", start="earliest")
        seen: Counter[int] = Counter()
        quiet_since = time.monotonic()
        deadline = time.monotonic() + 180
        while time.monotonic() - quiet_since < 5.0 or not acked <= seen.keys():
            assert time.monotonic() < deadline, f"{len(acked - seen.keys())} acknowledged messages missing"
            batch = consumer.receive(max_messages=500, timeout_s=1.0)
            if batch:
                consumer.ack(batch)
                seen.update(int(d.payload.split(b":", 1)[0]) for d in batch)
                quiet_since = time.monotonic()
        consumer.close()
        lost = acked - seen.keys()
        duplicates = sum(count - 1 for count in seen.values())
        print(
            f"kafka3 fault: killed node {victim + 1} (leader of partition 0); {len(acked)} acknowledged "
            f"({during} while it was down), {len(failed)} batches failed, {len(lost)} lost, "
            f"{duplicates} duplicates, {len(seen)} distinct read"
        )
        assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
        assert duplicates == 0, f"{duplicates} messages written twice"
        assert during > 0, "nothing was acknowledged while a node was down (min.insync.replicas=2)"
    finally:
        stop.set()
        producer.join(120)
        broker.delete_topic(topic)
        broker.close()
