"""The inference wire protocol: round trips, bounds and clear errors, and the Batcher's ordering."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from infeed.brokers.memory import MemoryBroker
from infeed.codecs import MsgpackCodec
from infeed.inference import (
    BatchConfig,
    Batcher,
    ErrorCode,
    Reply,
    ReplyError,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_topic,
    run_model,
)
from infeed.inference.protocol import InvalidRequestError


def _request(rid: str = "r1", *, rows: int = 1, deadline: float | None = None, priority: int = 0) -> Request:
    return Request(
        request_id=rid,
        reply_to="infeed.replies.c1",
        deadline=time.time() + 60 if deadline is None else deadline,
        model="m",
        priority=priority,
        inputs={"x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)},
    )


def test_request_and_reply_round_trip() -> None:
    request = _request(rows=3)
    back = decode_request(encode_request(request))
    assert back.request_id == "r1" and back.rows == 3 and back.model_version is None
    np.testing.assert_array_equal(back.inputs["x"], request.inputs["x"])
    assert request_topic("m", 2) == "infeed.requests.m.p2"
    ok = Reply(request_id="r1", model="m", model_version=7, outputs={"y": np.ones((3, 2), np.float32)})
    assert decode_reply(encode_reply(ok)).model_version == 7
    failed = Reply(request_id="r1", model="m", error=ReplyError(code=ErrorCode.MODEL_ERROR, message="boom"))
    back_failed = decode_reply(encode_reply(failed))
    assert back_failed.error == failed.error and not back_failed.ok


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"priority": 10}, "priority must be an int in"),
        ({"priority": True}, "priority must be an int in"),
        ({"reply_to": "bad topic"}, "outside"),
        ({"deadline": float("nan")}, "deadline must be finite"),
        ({"model": "a/b"}, "model name"),
        ({"model_version": -1}, "model_version"),
        ({"inputs": {}}, "non-empty mapping"),
        ({"inputs": {"x": np.ones((2, 1)), "y": np.ones((3, 1))}}, "has 3 rows"),
        ({"inputs": {"x": np.float32(1.0)}}, "must be a numpy array"),
        ({"inputs": {"x": np.ones(())}}, "leading rows dimension"),
    ],
)
def test_bad_requests_name_the_bad_value(change: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "request_id": "r",
        "reply_to": "infeed.replies.c",
        "deadline": 1.0,
        "model": "m",
        "inputs": {"x": np.ones((1, 2), np.float32)},
    }
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        Request(**fields)  # type: ignore[arg-type]


def test_an_invalid_request_keeps_what_can_answer_it() -> None:
    payload = MsgpackCodec().encode({"request_id": "r9", "reply_to": "infeed.replies.c", "model": "m"})
    with pytest.raises(InvalidRequestError, match="lacks") as caught:
        decode_request(payload)
    assert caught.value.request_id == "r9" and caught.value.reply_to == "infeed.replies.c"
    with pytest.raises(InvalidRequestError, match="undecodable") as garbage:
        decode_request(b"\x01\x02")
    assert garbage.value.request_id is None
    extra = MsgpackCodec().encode({**_request().to_record(), "surprise": 1})
    with pytest.raises(InvalidRequestError, match="unknown request fields"):
        decode_request(extra)


def test_batcher_orders_by_priority_then_deadline_and_sets_expired_apart() -> None:
    broker = MemoryBroker.from_url("memory://")
    topics = [request_topic("m", p) for p in range(2)]
    consumers = [broker.subscribe(t, group="w") for t in topics]
    now = 1000.0
    batcher = Batcher(consumers, BatchConfig(max_batch_size=3, max_wait_s=0.0), clock=lambda: now)
    broker.publish(topics[1], encode_request(_request("low-early", deadline=now + 1, priority=1)))
    broker.publish(topics[0], encode_request(_request("high-late", deadline=now + 9)))
    broker.publish(topics[0], encode_request(_request("high-early", deadline=now + 2)))
    broker.publish(topics[0], encode_request(_request("expired", deadline=now - 1)))
    broker.publish(topics[1], encode_request(_request("held", deadline=now + 5, priority=1)))
    broker.publish(topics[0], b"not msgpack")
    batch = batcher.next_batch(timeout_s=1.0)
    assert [p.request.request_id for p in batch.ready] == ["high-early", "high-late", "low-early"]
    assert [p.request.request_id for p in batch.expired] == ["expired"]  # took no room
    following = batcher.next_batch(timeout_s=1.0)
    assert [p.request.request_id for p in following.ready] == ["held"]  # held over: no wait
    assert len(batcher.next_batch(timeout_s=1.0).invalid) == 1
    assert not batcher.next_batch(timeout_s=0.0)


def test_batch_size_counts_rows_or_batch_size_fn() -> None:
    broker = MemoryBroker.from_url("memory://")
    consumer = broker.subscribe(request_topic("m"), group="w")
    for i in range(3):
        broker.publish(request_topic("m"), encode_request(_request(f"r{i}", rows=2)))
    by_rows = Batcher([consumer], BatchConfig(max_batch_size=4, max_wait_s=0.0))
    assert len(by_rows.next_batch(1.0).ready) == 2
    assert len(by_rows.next_batch(1.0).ready) == 1
    for i in range(3):
        broker.publish(request_topic("m"), encode_request(_request(f"s{i}", rows=2)))
    by_count = Batcher([consumer], BatchConfig(max_batch_size=4, max_wait_s=0.0, batch_size_fn=lambda r: 1))
    assert len(by_count.next_batch(1.0).ready) == 3
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchConfig(max_batch_size=0)


def test_run_model_calls_once_and_checks_row_counts() -> None:
    calls: list[int] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    outs = run_model(double, [_request("a", rows=1), _request("b", rows=2)])
    assert calls == [3] and [o["output"].shape[0] for o in outs] == [1, 2]
    with pytest.raises(ValueError, match="3 rows were given"):
        run_model(lambda x: x[:1], [_request("a", rows=1), _request("b", rows=2)])
    with pytest.raises(TypeError, match="tensor or array"):
        run_model(lambda x: {"y": [1]}, [_request("a")])


def test_public_names_resolve_and_a_client_needs_no_torch() -> None:
    import subprocess
    import sys

    import infeed.inference as inference

    for name in inference.__all__:
        assert getattr(inference, name) is not None
    code = "import sys; from infeed.inference import Client, AsyncClient; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
