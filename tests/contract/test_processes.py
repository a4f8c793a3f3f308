"""Real processes: a consumer killed with SIGKILL, and many producers and consumers at once."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from infeed.brokers import Broker
from infeed.types import Capability, Delivery, Position
from tests.support import spawn_python

from .backends import ACK_TIMEOUT_S
from .helpers import drain, numbered, payloads, require

WORKER = "tests.contract._worker"


def _crash_holder(broker: Broker, url: str, topic: str) -> tuple[list[Delivery], list[Position]]:
    """A child process receives 5 messages and is SIGKILLed holding them; another member drains them.

    Returns what the surviving member received and the positions the child held.
    """
    broker.create_topic(topic, partitions=1)
    survivor = broker.subscribe(topic, group="g")  # a member of the group before the crash
    broker.publish_many(topic, numbered(5))
    child = spawn_python("-m", WORKER, "hold", url, topic, "g", "5")
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        held = [Position.from_json(p) for p in json.loads(line or "[]")]
        assert len(held) == 5, f"child held {held}; stderr: {child.stderr.read() if child.stderr else ''}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
    return drain(survivor, 5, timeout_s=ACK_TIMEOUT_S + 30), held


def test_sigkilled_consumer_messages_go_to_another_member(broker: Broker, url: str, topic: str) -> None:
    require(broker, Capability.MULTI_PROCESS, Capability.REDELIVERY)
    got, held = _crash_holder(broker, url, topic)
    assert payloads(got) == numbered(5)
    assert [d.position for d in got] == held


def test_sigkilled_consumer_redelivery_is_counted(broker: Broker, url: str, topic: str) -> None:
    require(broker, Capability.MULTI_PROCESS, Capability.REDELIVERY, Capability.CRASH_DELIVERY_COUNT)
    got, held = _crash_holder(broker, url, topic)
    assert [d.position for d in got] == held
    assert [d.delivery_count for d in got] == [2] * 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_producers_two_consumers_no_loss_no_duplicates(
    broker: Broker, url: str, topic: str, tmp_path: Path
) -> None:
    require(broker, Capability.MULTI_PROCESS)
    total, producers, per = 100_000, 4, 25_000
    partitions = 4 if Capability.PARTITIONS in broker.capabilities else 1
    broker.create_topic(topic, partitions=partitions)
    broker.subscribe(topic, group="g").close()  # the group exists before the first publish
    done = tmp_path / "producers-done"
    outs = [tmp_path / f"consumer-{i}.json" for i in range(2)]
    consumers = [
        spawn_python("-m", WORKER, "consume", url, topic, "g", str(out), str(done), str(ACK_TIMEOUT_S * 3))
        for out in outs
    ]
    for c in consumers:  # both compete from the first message (a late starter could miss them all)
        assert c.stdout is not None
        ready = c.stdout.readline()
        assert ready == "ready\n", f"consumer did not start: {ready!r} {c.stderr.read() if c.stderr else ''}"
    prods = [
        spawn_python("-m", WORKER, "produce", url, topic, str(i * per), str(per), "500")
        for i in range(producers)
    ]
    try:
        for p in prods:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"producer failed: {err}"
        done.touch()
        for c in consumers:
            _, err = c.communicate(timeout=600)
            assert c.returncode == 0, f"consumer failed: {err}"
    finally:
        for p in [*prods, *consumers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads(out.read_text()) for out in outs]
    acked = Counter(i for r in results for i in r["acked"])
    duplicates = [i for i, n in acked.items() if n > 1]
    assert not duplicates, f"{len(duplicates)} ids acked twice within the group, e.g. {duplicates[:5]}"
    missing = set(range(total)) - set(acked)
    assert not missing, f"{len(missing)} ids never acked, e.g. {sorted(missing)[:5]}"
    assert all(r["acked"] for r in results), "one consumer got nothing: no competition was tested"
