"""Worker + Client over memory:// and sqlite://: batches, deadlines, poison, versions, backpressure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from infeed.brokers import Broker, connect
from infeed.brokers.base import DLQ_HEADER_REASON, dead_letter_topic
from infeed.errors import DeadlineExceededError, InferenceError, QueueFull
from infeed.inference import (
    AsyncClient,
    BatchConfig,
    Client,
    ClientConfig,
    ErrorCode,
    InferenceMetrics,
    ModelRegistry,
    Reply,
    Worker,
    WorkerConfig,
    announce,
    encode_reply,
    request_topic,
)
from tests.inference_models import POISON, publish_probe, read_log

X = np.ones((1, 4), np.float32)


@pytest.fixture(params=["memory", "sqlite"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    with connect(url) as b:
        yield b


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models")
    publish_probe(reg, "m", 1, 2.0, log=str(tmp_path / "calls.jsonl"))
    return reg


def _worker(broker: Broker, registry: ModelRegistry, **batch: object) -> Worker:
    config = WorkerConfig(batch=BatchConfig(max_wait_s=0.0, **batch))  # type: ignore[arg-type]
    return Worker(broker, registry, "m", config=config, middleware=[InferenceMetrics()])


def test_one_model_call_per_batch_and_replies_name_the_version(
    broker: Broker, registry: ModelRegistry, tmp_path: Path
) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        futures = [client.submit(X * i) for i in range(5)]
        assert worker.run_once(timeout_s=5.0) == 5
        replies = [f.result(timeout=10) for f in futures]
        assert [r.model_version for r in replies] == [1] * 5
        np.testing.assert_array_equal(replies[3].outputs["output"], X * 3 * 2.0)
        calls = read_log(tmp_path / "calls.jsonl")
        assert calls == [{"rows": 5, "late": 0, "pid": calls[0]["pid"]}]
        metrics = generate_latest(worker.middleware[0].registry).decode()  # type: ignore[attr-defined]
        assert 'infeed_inference_requests_total{outcome="ok"} 5.0' in metrics


def test_poison_is_isolated_inside_its_batch(broker: Broker, registry: ModelRegistry) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        futures = [client.submit(np.full((1, 4), POISON if i == 5 else i, np.float32)) for i in range(8)]
        assert worker.run_once(timeout_s=5.0) == 8
        for i, future in enumerate(futures):
            if i == 5:
                with pytest.raises(InferenceError, match="poison input") as caught:
                    future.result(timeout=10)
                assert caught.value.code == ErrorCode.MODEL_ERROR and caught.value.model_version == 1
            else:
                assert future.result(timeout=10).outputs["output"][0, 0] == 2.0 * i
        dlq = broker.subscribe(dead_letter_topic(request_topic("m")), group="audit")
        [copy] = dlq.receive(max_messages=10, timeout_s=5.0)
        assert "poison input" in copy.headers[DLQ_HEADER_REASON]
        dlq.close()
        assert worker.run_once(timeout_s=0.0) == 0  # nothing redelivered: all settled


def test_expired_requests_are_answered_and_never_computed(
    broker: Broker, registry: ModelRegistry, tmp_path: Path
) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        late = client.submit(X, timeout_s=0.05)
        with pytest.raises(DeadlineExceededError):
            late.result(timeout=10)  # the client gives up locally first
        fresh = client.submit(X)
        assert worker.run_once(timeout_s=5.0) == 2
        assert fresh.result(timeout=10).ok
        assert sum(line["rows"] for line in read_log(tmp_path / "calls.jsonl")) == 1
        metrics = generate_latest(worker.middleware[0].registry).decode()  # type: ignore[attr-defined]
        assert "infeed_inference_deadline_misses_total 1.0" in metrics


def test_invalid_and_unknown_version_get_error_replies(broker: Broker, registry: ModelRegistry) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        missing = client.submit(X, model_version=99)
        wrong_shape = client.submit(np.ones((1, 3), np.float32))
        worker.run_once(timeout_s=5.0)
        with pytest.raises(InferenceError, match="no version 99") as caught:
            missing.result(timeout=10)
        assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
        with pytest.raises(InferenceError) as bad:
            wrong_shape.result(timeout=10)
        assert bad.value.code == ErrorCode.MODEL_ERROR
        with pytest.raises(ValueError, match="priority"):
            client.submit(X, priority=-1)


def test_hot_reload_swaps_between_batches_and_keeps_pins(broker: Broker, registry: ModelRegistry) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        first = client.submit(X)
        worker.run_once(timeout_s=5.0)
        assert first.result(timeout=10).model_version == 1
        publish_probe(registry, "m", 2, 3.0, log=None)
        announce(broker, registry.get("m", 2))
        for _ in range(200):  # the follower loads v2 in its thread; installed between batches
            worker.run_once(timeout_s=0.05)
            if worker.models.current == 2:
                break
        assert worker.models.current == 2
        new, pinned = client.submit(X), client.submit(X, model_version=1)
        worker.run_once(timeout_s=5.0)
        assert new.result(timeout=10).model_version == 2
        assert new.result().outputs["output"][0, 0] == 3.0
        assert pinned.result(timeout=10).model_version == 1


def test_duplicate_replies_are_dropped(broker: Broker, registry: ModelRegistry) -> None:
    with Client(broker, "m") as client, _worker(broker, registry) as worker:
        future = client.submit(X)
        worker.run_once(timeout_s=5.0)
        reply = future.result(timeout=10)
        again = Reply(request_id=reply.request_id, model="m", model_version=1, outputs=reply.outputs)
        broker.publish(client.reply_topic, encode_reply(again))
        second = client.submit(X)
        worker.run_once(timeout_s=5.0)
        second.result(timeout=10)
        assert client.duplicates == 1 and client.in_flight == 0


def test_queue_full_is_raised_at_once(broker: Broker, registry: ModelRegistry) -> None:
    config = ClientConfig(max_queue_depth=2, depth_cache_s=0.0)
    with Client(broker, "m", config=config) as client, _worker(broker, registry) as worker:
        futures = [client.submit(X) for _ in range(3)]
        with pytest.raises(QueueFull, match=r"infeed.requests.m.p0 holds 3 requests") as caught:
            client.submit(X)
        assert caught.value.retry_after_s > 0
        client.submit(X, priority=1)  # the depth is per priority level
        while worker.run_once(timeout_s=1.0):
            pass
        for f in futures:
            f.result(timeout=10)
        client.submit(X).cancel()  # the backlog is what the workers have not done: room again


def test_async_client_is_the_same_client(broker: Broker, registry: ModelRegistry) -> None:
    stop = threading.Event()
    with _worker(broker, registry) as worker:
        thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_s": 0.05})
        thread.start()
        try:

            async def main() -> list[dict[str, np.ndarray]]:
                async with AsyncClient(broker, "m") as client:
                    return await asyncio.gather(*(client.predict(X * i, timeout_s=30) for i in range(4)))

            outputs = asyncio.run(main())
        finally:
            stop.set()
            thread.join()
    assert [o["output"][0, 0] for o in outputs] == [0.0, 2.0, 4.0, 6.0]
