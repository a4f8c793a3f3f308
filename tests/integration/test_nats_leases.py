"""NATS leases against members paused (SIGSTOP) while a delivery is on its way to them.

nats-server accepts an ack for a delivery it already gave to another member, so a member must
time each lease from no later than the server's send. These tests pause a real member process
while the server sends it messages, let the ack wait pass so another member gets them, then
resume it: its late deliveries must not be acked as its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from infeed.brokers import Broker, connect
from infeed.brokers._nats_link import durable_of, stream_of
from tests.support import broker_url, running_brokers, spawn_python

pytestmark = [pytest.mark.needs_broker("nats"), pytest.mark.timeout(120)]

#: The ack wait of these tests: the lease is trusted for half of it.
ACK_WAIT_S = 1.0
MEMBER = "tests.integration._nats_member"


def _url(**options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"ack_timeout_s": ACK_WAIT_S, **options}.items())
    return f"{broker_url('nats')}?{query}"


@contextmanager
def _member(url: str, topic: str, timeout_s: float) -> Iterator[subprocess.Popen[str]]:
    child = spawn_python("-m", MEMBER, url, topic, "g", str(timeout_s), stdin=subprocess.PIPE)
    try:
        assert _line(child) == "ready"
        yield child
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        err = child.stderr.read() if child.stderr is not None else ""
        pytest.fail(f"the member exited: {err}")
    return line.strip()


def _receive_once(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()


def _result(child: subprocess.Popen[str]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(_line(child))
    return out


def _consumer(broker: Broker, topic: str) -> dict[str, Any]:
    """The server's state of the group's consumer of partition 0 (``num_waiting``...)."""
    link = broker._link  # type: ignore[attr-defined]
    info: dict[str, Any] = broker._run(  # type: ignore[attr-defined]
        link.api(f"CONSUMER.INFO.{stream_of(topic)}.{durable_of('g', 0)}")
    )
    return info


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = connect(_url())
    yield b
    b.close()


def test_a_paused_member_does_not_ack_what_its_long_poll_brought_after_another_member_got_it(
    broker: Broker,
) -> None:
    """A message answers a member's long poll while the member is paused past the ack wait; the
    server gives it to another member, which acks it. Resumed, the first member reads it late:
    its lease counts from its request, so it does not take the message as its own."""
    topic = f"lease-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, partitions=1)
    try:
        with _member(_url(), topic, timeout_s=3.0) as paused:
            _receive_once(paused)  # a long poll: nothing is there yet
            _until("the long poll reached the server", lambda: _consumer(broker, topic)["num_waiting"] > 0)
            paused.send_signal(signal.SIGSTOP)
            broker.publish(topic, b"m")  # sent to the paused member's long poll
            other = broker.subscribe(topic, group="g")
            got = other.receive(max_messages=10, timeout_s=20)  # again, after the ack wait
            assert [d.payload for d in got] == [b"m"]
            other.ack(got)
            other.close()
            paused.send_signal(signal.SIGCONT)
            assert "m" not in _result(paused).get("acked", []), "both members acked the same message"
            _receive_once(paused)
            assert "m" not in _result(paused).get("acked", []), "both members acked the same message"
    finally:
        broker.delete_topic(topic)


def test_a_pull_given_up_on_is_timed_from_its_request_when_its_answer_comes_late(broker: Broker) -> None:
    """A member's pull gets no answer in time (the server is paused) and is given up on; the
    member is paused while the server answers it and gives the messages to another member after
    the ack wait. Resumed, the first member reads the late answer: not as fresh deliveries."""
    entry = running_brokers().get("nats", {})
    server = int(entry["pids"][0])
    topic = f"lease-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, partitions=1)
    # quick to give up on the server, so the member says when it has
    url = _url(request_timeout_s=0.3, reconnect_attempts=1, reconnect_backoff_s=0.05)
    try:
        with _member(url, topic, timeout_s=0.2) as paused:
            other = broker.subscribe(topic, group="g")
            broker.publish_many(topic, [b"m0", b"m1", b"m2"])
            os.kill(server, signal.SIGSTOP)
            try:
                _receive_once(paused)  # its pull waits in the paused server's socket
                assert "error" in _result(paused)  # it gave up on the server
                paused.send_signal(signal.SIGSTOP)
            finally:
                os.kill(server, signal.SIGCONT)  # the server answers the pull now, to the paused member
            _until("the pull was answered", lambda: _consumer(broker, topic)["num_ack_pending"] == 3)
            got = other.receive(max_messages=10, timeout_s=20)  # after the ack wait
            assert sorted((d.payload, d.delivery_count) for d in got) == [(b"m0", 2), (b"m1", 2), (b"m2", 2)]
            other.ack(got)
            other.close()
            paused.send_signal(signal.SIGCONT)
            _receive_once(paused)
            assert not _result(paused).get("acked"), "both members acked the same messages"
    finally:
        broker.delete_topic(topic)
