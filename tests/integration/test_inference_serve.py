"""The inference tests that matter, with real worker processes (``infeed serve``) and real brokers.

* Workers SIGKILLed under steady load: every request the client sent is answered, exactly once
  from the client's view, on sqlite and redis.
* Overload with short deadlines: no request past its deadline reaches the model (the model itself
  counts the rows it is given that are already late), and each computed row is one success reply.
* A poison request inside a batch: only it fails, with a dead-letter copy.
* A new version announced under load: no request fails and replies name both versions.

Each worker process costs a Python start and a torch import (seconds on a loaded machine), so
each test starts as few as it can.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from infeed.brokers import Broker, connect
from infeed.brokers.base import DLQ_HEADER_REASON, Message, dead_letter_topic
from infeed.errors import InferenceError
from infeed.inference import (
    Client,
    ClientConfig,
    ErrorCode,
    ModelRegistry,
    Reply,
    Request,
    Worker,
    announce,
    decode_reply,
    encode_request,
    request_topic,
)
from tests.inference_models import POISON, publish_probe, read_log
from tests.support import broker_url, spawn_python

pytestmark = pytest.mark.slow

#: Lease of an unacked request: how soon a killed worker's requests go to another.
ACK_TIMEOUT_S = 2.0
#: How long a worker process may take to start (Python + torch on a loaded machine).
START_S = 120.0


class Server:
    """``infeed serve`` in a child process; ``ready`` is set once its workers say they serve."""

    def __init__(self, url: str, registry: Path, model: str, *args: str, workers: int = 1) -> None:
        self.proc = spawn_python(
            "-m", "infeed", "--broker", url, "serve", "--model", model, "--registry-dir", str(registry),
            "--workers", str(workers), *args,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.lines: list[str] = []
        self._serving = 0
        self._workers = workers
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if " serving " in line:
                self._serving += 1
                if self._serving >= self._workers:
                    self.ready.set()
        self.proc.stderr.close()  # end of output: the process is gone

    def wait_ready(self) -> None:
        if not self.ready.wait(START_S):
            raise AssertionError(f"infeed serve did not start: {''.join(self.lines)[-2000:]}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.db'}?ack_timeout_s={ACK_TIMEOUT_S}"
    return f"{broker_url('redis')}?ack_timeout_s={ACK_TIMEOUT_S}"


@pytest.fixture
def name() -> str:
    return f"m{uuid.uuid4().hex[:10]}"  # a fresh model, so runs on a shared broker never mix


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def _raw_replies(broker: Broker, topic: str, count: int, timeout_s: float = 120.0) -> dict[str, Reply]:
    consumer = broker.subscribe(topic, group="test", start="earliest")
    replies: dict[str, Reply] = {}
    end = time.monotonic() + timeout_s
    try:
        while len(replies) < count and time.monotonic() < end:
            deliveries = consumer.receive(max_messages=200, timeout_s=1.0)
            for d in deliveries:
                reply = decode_reply(d.payload)
                assert reply.request_id not in replies, "one worker answered a request twice"
                replies[reply.request_id] = reply
            if deliveries:
                consumer.ack(deliveries)
    finally:
        consumer.close()
    return replies


@pytest.mark.timeout(400)  # three worker restarts, each a Python start and a torch import
def test_sigkilled_workers_lose_no_request(
    url: str, name: str, tmp_path: Path, servers: list[Server]
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    publish_probe(registry, name, 1, 2.0, sleep_s=0.01)
    args = ("--max-wait-ms", "5", "--no-follow")
    servers += [Server(url, registry.root, name, *args) for _ in range(2)]
    for server in servers:
        server.wait_ready()
    futures: list[Future[Reply]] = []
    stop = threading.Event()
    with connect(url) as broker, Client(broker, name, config=ClientConfig(timeout_s=300.0)) as client:

        def load() -> None:
            i = 0
            while not stop.wait(0.01):
                futures.append(client.submit(np.full((1, 4), i, np.float32)))
                i += 1

        loader = threading.Thread(target=load)
        loader.start()
        try:
            for kill in range(3):
                done = sum(f.done() for f in futures)
                while sum(f.done() for f in futures) < done + 30:  # work in progress when killed
                    stop.wait(0.05)
                victim = kill % 2
                servers[victim].kill()
                servers.append(Server(url, registry.root, name, *args))
                servers[victim] = servers.pop()
                servers[victim].wait_ready()
        finally:
            stop.set()
            loader.join()
        replies = [f.result(timeout=300) for f in futures]
        duplicates = client.duplicates
    assert len(futures) > 100
    assert len({r.request_id for r in replies}) == len(futures)
    for i, reply in enumerate(replies):
        assert reply.model_version == 1
        np.testing.assert_array_equal(reply.outputs["output"], np.full((1, 4), 2.0 * i, np.float32))
    print(f"{len(futures)} requests, 3 workers killed, {duplicates} duplicate replies dropped")


def test_expired_requests_never_reach_the_model_and_poison_is_isolated(
    url: str, name: str, tmp_path: Path, servers: list[Server]
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    log = tmp_path / "calls.jsonl"
    publish_probe(registry, name, 1, 2.0, sleep_s=0.05, log=str(log))
    args = ("--max-batch-size", "4", "--max-wait-ms", "1", "--min-time-left-ms", "50", "--no-follow")
    servers.append(Server(url, registry.root, name, *args))
    servers[0].wait_ready()
    with connect(url) as broker:
        reply_to = f"infeed.replies.{name}"
        broker.create_topic(reply_to)
        sent = 200
        messages = []
        for i in range(sent):
            deadline = time.time() + 0.5
            inputs = {"x": np.full((1, 4), i, np.float32), "deadline": np.array([deadline])}
            request = Request(
                request_id=str(i), reply_to=reply_to, deadline=deadline, model=name, inputs=inputs
            )
            messages.append(Message(encode_request(request)))
        broker.publish_many(request_topic(name), messages)
        replies = _raw_replies(broker, reply_to, sent)
        assert len(replies) == sent
        codes = Counter("OK" if r.error is None else str(r.error.code) for r in replies.values())
        assert set(codes) == {"OK", ErrorCode.DEADLINE_EXCEEDED}, codes  # overloaded: both happened
        calls = read_log(log)
        assert sum(c["late"] for c in calls) == 0  # no expired row ever reached the model
        assert sum(c["rows"] for c in calls) == codes["OK"]  # every computed row is one success

        poison_at = 6
        batch = []
        for i in range(12):
            value = POISON if i == poison_at else float(i)
            inputs = {"x": np.full((1, 4), value, np.float32), "deadline": np.array([time.time() + 600])}
            request = Request(
                request_id=f"p{i}", reply_to=reply_to, deadline=time.time() + 600, model=name, inputs=inputs
            )
            batch.append(Message(encode_request(request)))
        broker.publish_many(request_topic(name), batch)
        poisoned = _raw_replies(broker, reply_to, 12)  # the group goes on after the first replies
        assert len(poisoned) == 12
        for i in range(12):
            reply = poisoned[f"p{i}"]
            if i == poison_at:
                assert reply.error is not None and reply.error.code is ErrorCode.MODEL_ERROR
                assert "poison input" in reply.error.message
            else:
                assert reply.ok and reply.outputs["output"][0, 0] == 2.0 * i
        dlq = broker.subscribe(dead_letter_topic(request_topic(name)), group="audit")
        [copy] = dlq.receive(max_messages=10, timeout_s=10.0)
        assert "poison input" in copy.headers[DLQ_HEADER_REASON]
        dlq.close()


@pytest.mark.timeout(300)
def test_version_swap_under_load(url: str, name: str, tmp_path: Path, servers: list[Server]) -> None:
    registry = ModelRegistry(tmp_path / "models")
    publish_probe(registry, name, 1, 2.0)
    servers.append(Server(url, registry.root, name, "--max-wait-ms", "5", workers=2))
    servers[0].wait_ready()
    futures: list[Future[Reply]] = []
    stop = threading.Event()
    with connect(url) as broker, Client(broker, name, config=ClientConfig(timeout_s=120.0)) as client:

        def load() -> None:
            i = 0
            while not stop.wait(0.01):
                futures.append(client.submit(np.full((1, 4), i, np.float32)))
                i += 1

        loader = threading.Thread(target=load)
        loader.start()
        try:
            while sum(f.done() for f in futures) < 50:
                stop.wait(0.05)
            publish_probe(registry, name, 2, 3.0)
            announce(broker, registry.get(name, 2))
            mark = len(futures)
            while not any(f.done() and f.result().model_version == 2 for f in futures[mark:]):
                stop.wait(0.05)
            while sum(f.done() for f in futures[mark:]) < 100:
                stop.wait(0.05)
        finally:
            stop.set()
            loader.join()
        replies = [f.result(timeout=120) for f in futures]  # raises if any request failed
    versions = Counter(r.model_version for r in replies)
    assert set(versions) == {1, 2}, versions
    for i, reply in enumerate(replies):
        scale = 2.0 if reply.model_version == 1 else 3.0
        np.testing.assert_array_equal(reply.outputs["output"], np.full((1, 4), scale * i, np.float32))


@pytest.mark.timeout(300)
def test_worker_and_client_on_kafka(name: str, tmp_path: Path) -> None:
    """In one process (a Kafka group join costs seconds per consumer): batches, versions, poison."""
    url = f"{broker_url('kafka')}?ack_timeout_s={ACK_TIMEOUT_S}"
    registry = ModelRegistry(tmp_path / "models")
    publish_probe(registry, name, 1, 2.0)
    stop = threading.Event()
    config = ClientConfig(timeout_s=120.0, max_queue_depth=10_000, depth_cache_s=0.1)
    with connect(url) as broker, Worker(broker, registry, name) as worker:
        thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_s": 0.1})
        thread.start()
        try:
            with Client(broker, name, config=config) as client:
                futures = [client.submit(np.full((1, 4), i, np.float32)) for i in range(50)]
                poison = client.submit(np.full((1, 4), POISON, np.float32))
                for i, future in enumerate(futures):
                    reply = future.result(timeout=120)
                    assert reply.model_version == 1 and reply.outputs["output"][0, 0] == 2.0 * i
                with pytest.raises(InferenceError, match="poison input"):
                    poison.result(timeout=120)
        finally:
            stop.set()
            thread.join()
