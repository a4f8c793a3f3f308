"""The kafka:// backend's one error boundary, its URL options, and its ack ledger (no server)."""

from __future__ import annotations

import socket
import time
from types import ModuleType

import confluent_kafka
import confluent_kafka.cimpl
import confluent_kafka.error
import confluent_kafka.serialization
import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import given
from hypothesis import strategies as st

from infeed.brokers import connect
from infeed.brokers._kafka_ledger import MAX_METADATA_CHARS, Ledger, Pending, Saved, decode, encode
from infeed.brokers.kafka import KafkaBroker, KafkaConfig, _map_errors
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    InfeedError,
    LeaseLostError,
    PayloadTooLargeError,
    TopicNotFoundError,
)
from infeed.types import Delivery, Position
from tests.unit.error_mapping import (
    assert_passes_through,
    build_exception,
    client_exceptions,
    exception_id,
    raise_through,
)

WHERE = "kafka://127.0.0.1:9092"
_MODULES: tuple[ModuleType, ...] = (
    confluent_kafka,
    confluent_kafka.cimpl,
    confluent_kafka.error,
    confluent_kafka.serialization,
)
CLIENT_EXCEPTIONS = client_exceptions(_MODULES, ("confluent_kafka", "cimpl"))
ERROR_CODES = sorted(
    {v for n, v in vars(KafkaError).items() if not n.startswith("__") and isinstance(v, int)}
)


def test_the_walk_finds_the_client_exceptions() -> None:
    names = {cls.__name__ for cls in CLIENT_EXCEPTIONS}
    assert {"KafkaException", "ConsumeError", "ProduceError", "SerializationError"} <= names
    assert {"IllegalStateException", "ConcurrentModificationException"} <= names
    assert len(ERROR_CODES) > 150


@pytest.mark.parametrize("cls", CLIENT_EXCEPTIONS, ids=exception_id)
def test_every_client_exception_maps_into_the_tree(cls: type[BaseException]) -> None:
    exc = build_exception(cls, (KafkaError(KafkaError._TRANSPORT),), ("boom",), ())
    raise_through(_map_errors(WHERE), exc, WHERE)


@pytest.mark.parametrize("code", ERROR_CODES)
def test_every_librdkafka_error_code_maps_into_the_tree(code: int) -> None:
    error = raise_through(_map_errors(WHERE, "doing a thing"), KafkaException(KafkaError(code)), WHERE)
    assert "doing a thing" in str(error)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (KafkaError._TRANSPORT, BrokerConnectionError),
        (KafkaError._ALL_BROKERS_DOWN, BrokerConnectionError),
        (KafkaError.NOT_COORDINATOR, BrokerConnectionError),
        (KafkaError.LEADER_NOT_AVAILABLE, BrokerConnectionError),
        (KafkaError._TIMED_OUT, BrokerTimeoutError),
        (KafkaError._MSG_TIMED_OUT, BrokerTimeoutError),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, TopicNotFoundError),
        (KafkaError._UNKNOWN_PARTITION, TopicNotFoundError),
        (KafkaError.MSG_SIZE_TOO_LARGE, PayloadTooLargeError),
        (KafkaError.ILLEGAL_GENERATION, LeaseLostError),
        (KafkaError.UNKNOWN_MEMBER_ID, LeaseLostError),
        (KafkaError.REBALANCE_IN_PROGRESS, LeaseLostError),
        (KafkaError.TOPIC_ALREADY_EXISTS, BrokerError),
        (KafkaError._INVALID_ARG, BrokerError),
    ],
    ids=lambda value: KafkaError(value).name() if isinstance(value, int) else value.__name__,
)
def test_specific_mappings(code: int, expected: type[InfeedError]) -> None:
    error = raise_through(_map_errors(WHERE), KafkaException(KafkaError(code)), WHERE)
    assert isinstance(error, expected)
    if expected is BrokerError:
        assert type(error) is BrokerError


def test_infeed_errors_and_unrelated_errors_pass_through() -> None:
    assert_passes_through(_map_errors, WHERE)
    with pytest.raises(BrokerTimeoutError), _map_errors(WHERE):
        raise TimeoutError  # an admin future's result(timeout)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_unreachable_broker_fails_after_bounded_retries_naming_the_url() -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        connect(f"kafka://127.0.0.1:{port}?reconnect_attempts=3&reconnect_backoff_s=0.2")
    assert f"kafka://127.0.0.1:{port}" in str(info.value)
    assert "after 3 reconnect attempts" in str(info.value)
    assert time.monotonic() - started < 15


def test_url_options_become_a_frozen_config() -> None:
    with pytest.raises(ConfigError, match="session_timeout_s"):
        KafkaBroker.from_url("kafka://127.0.0.1:1?session_timeout=3")
    with pytest.raises(ConfigError, match="host:port"):
        KafkaBroker.from_url("kafka://127.0.0.1:notaport")
    with pytest.raises(ConfigError, match="expected kafka://"):
        KafkaBroker.from_url("kafka://user:pw@127.0.0.1:1")
    with pytest.raises(ConfigError, match="expected kafka://"):
        KafkaBroker.from_url("kafka://127.0.0.1:1/path")
    with pytest.raises(ConfigError, match="max_poll_interval_s"):
        KafkaBroker.from_url("kafka://127.0.0.1:1?max_poll_interval_s=2&session_timeout_s=6")
    with pytest.raises(ConfigError, match="compression"):
        KafkaBroker.from_url("kafka://127.0.0.1:1?compression=brotli")
    config = KafkaConfig(bootstrap="a:1,b:2", ack_timeout_s=1.0, session_timeout_s=6.0)
    assert config.url == "kafka://a:1,b:2"
    assert config.max_poll_s == 6.0  # the larger of ack_timeout_s and session_timeout_s
    assert config.join_s == 6.0 + 6.0 + 30.0
    assert KafkaConfig(bootstrap="a:1", ack_timeout_s=60).max_poll_s == 60
    budget = KafkaConfig(
        bootstrap="a:1", reconnect_attempts=4, reconnect_backoff_s=1, reconnect_backoff_max_s=3
    )
    assert budget.reconnect_budget_s == 1 + 2 + 3 + 3
    with pytest.raises(AttributeError):
        config.bootstrap = "c:3"  # type: ignore[misc]


# -- the ledger stored in the commit metadata ----------------------------------------------------


def _delivery(offset: int, count: int, receipt: int) -> Delivery:
    return Delivery(b"p", None, {}, Position("t", 0, offset), count, 0.0, receipt)


#: per offset: "ack" (acked), "hold" (handed out, unacked), "nack" (given back), "skip" (never read)
_STEPS = st.lists(st.sampled_from(["ack", "hold", "nack", "ack", "ack"]), min_size=0, max_size=60)


def _run_owner(start: int, steps: list[str], rounds: int) -> tuple[Ledger, dict[int, int | None]]:
    """An owner reads ``steps`` from ``start``: returns its ledger and each offset's expectation.

    Expectation: None = acked (must be skipped by the next owner), k = handed out k times.
    """
    ledger = Ledger(0, start)
    expect: dict[int, int | None] = {}
    for i, step in enumerate(steps):
        offset = start + i
        count = ledger.accept(offset)
        assert count == 1
        d = _delivery(offset, 1, offset)
        ledger.lease(d, 0.0)
        for r in range(rounds if step == "nack" else 0):  # given back and handed out again
            entry = ledger.pending[offset]
            again = _delivery(offset, entry.delivery.delivery_count + 1, 10_000 + 100 * offset + r)
            ledger.pending[offset] = Pending(again, 0.0)
        if step == "ack":
            assert ledger.settle(offset, ledger.pending[offset].delivery.receipt) is not None
            expect[offset] = None
        else:
            expect[offset] = ledger.pending[offset].delivery.delivery_count
    return ledger, expect


@given(st.integers(0, 10**12), _STEPS, st.integers(0, 3), st.one_of(st.none(), st.integers(0, 10**12)))
def test_the_next_owner_skips_acked_offsets_and_counts_on(
    start: int, steps: list[str], rounds: int, commit: int | None
) -> None:
    first, expect = _run_owner(start, steps, rounds)
    first.commit = commit
    saved = first.snapshot()
    text = encode(saved)
    assert len(text) <= MAX_METADATA_CHARS
    restored = decode(saved.offset, text)
    assert restored == saved
    assert restored.commit == commit
    assert restored.unacked == sum(1 for v in expect.values() if v is not None)
    second = Ledger.take_over(0, restored)
    assert second.fetch == saved.offset
    acked_prefix = [o for o in sorted(expect) if o < saved.offset]
    assert all(expect[o] is None for o in acked_prefix), "the watermark passed an unacked offset"
    half = saved.offset + (start + len(steps) + 3 - saved.offset) // 2
    again: dict[int, int | None] = {}
    for offset in range(saved.offset, start + len(steps) + 3):
        if offset == half:  # the second owner dies halfway: a third one takes over
            third = Ledger.take_over(0, decode(second.snapshot().offset, encode(second.snapshot())))
            for o, want in again.items():
                if o >= third.fetch:
                    assert third.accept(o) == (None if want is None else want + 1), (o, want)
            second = third
        count = second.accept(offset)
        if offset in expect:
            want = expect[offset]
            assert count == (None if want is None else want + 1), (offset, count, want)
        else:
            assert count == 1
        if count is not None:
            second.lease(_delivery(offset, count, offset), 0.0)
        again[offset] = count


def test_the_cap_forgets_the_tail_not_the_head() -> None:
    ledger, _ = _run_owner(0, ["hold", "ack"] * 3000, 0)
    saved = ledger.snapshot()
    text = encode(saved)
    assert len(text) <= MAX_METADATA_CHARS
    restored = decode(saved.offset, text)
    assert restored.offset == 0 and restored.runs[0] == (0, 1)
    assert restored.end < saved.end  # past the cap: never handed out, as far as anyone knows
    second = Ledger.take_over(0, restored)
    assert [second.accept(o) for o in range(4)] == [2, None, 2, None]
    assert second.accept(restored.end + 1) == 1


@pytest.mark.parametrize("metadata", [None, "", "not json", '{"c": 3}', "[1,2]", '{"infeed": 2}'])
def test_foreign_metadata_keeps_the_kafka_offset_as_the_commit(metadata: str | None) -> None:
    saved = decode(42, metadata)
    assert saved == Saved(42, commit=42, end=42, ours=False)
    assert Ledger.take_over(0, saved).accept(42) == 1


@pytest.mark.parametrize(
    "metadata",
    ['{"infeed":1,"f":3,"r":[0,1,1]}', '{"infeed":1,"f":9,"r":[2,1,1,0]}', '{"infeed":1,"f":-1,"r":[]}'],
)
def test_damaged_metadata_of_ours_falls_back_to_the_watermark(metadata: str) -> None:
    saved = decode(5, metadata)
    assert saved.offset == 5 and saved.runs == () and saved.end == 5


def test_seek_moves_the_ledger() -> None:
    ledger, _ = _run_owner(0, ["ack", "hold", "hold", "ack"], 0)
    ledger.seek(2)  # back: the delivery at 2 is dropped, 1 stays pending
    assert sorted(ledger.pending) == [1] and ledger.fetch == 2
    assert ledger.snapshot().offset == 1
    ledger.seek(10)  # forward: 2..9 count as done
    saved = ledger.snapshot()
    assert saved.offset == 1 and saved.end == 10 and saved.runs == ((1, 1), (2, 0))
