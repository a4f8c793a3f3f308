"""The redis:// backend's one error boundary, its URL options and its wire format (no server)."""

from __future__ import annotations

import socket
import time

import hiredis
import pytest
import redis.exceptions as rx
from hypothesis import given
from hypothesis import strategies as st

from infeed.brokers import _redis_wire as wire
from infeed.brokers import connect
from infeed.brokers.redis import RedisBroker, RedisConfig, _map_errors
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    InfeedError,
    TopicNotFoundError,
)
from tests.unit.error_mapping import (
    assert_passes_through,
    build_exception,
    client_exceptions,
    exception_id,
    raise_through,
)

WHERE = "redis://127.0.0.1:6379/0"

CLIENT_EXCEPTIONS = client_exceptions((rx, hiredis), ("redis", "hiredis"))


def test_the_walk_finds_the_client_exceptions() -> None:
    names = {cls.__name__ for cls in CLIENT_EXCEPTIONS}
    assert {"RedisError", "ConnectionError", "ResponseError", "HiredisError"} <= names
    assert len(CLIENT_EXCEPTIONS) > 30


@pytest.mark.parametrize("cls", CLIENT_EXCEPTIONS, ids=exception_id)
def test_every_client_exception_maps_into_the_tree(cls: type[BaseException]) -> None:
    # cluster redirects want 'slot host:port'
    exc = build_exception(cls, ("boom",), ("3999 127.0.0.1:6381",), ())
    raise_through(_map_errors(WHERE), exc, WHERE)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (rx.ConnectionError("Error 111 connecting"), BrokerConnectionError),
        (rx.BusyLoadingError("Redis is loading the dataset in memory"), BrokerConnectionError),
        (rx.AuthenticationError("invalid username-password pair"), BrokerConnectionError),
        (rx.TimeoutError("Timeout reading from socket"), BrokerTimeoutError),
        (rx.ResponseError("NOGROUP No such key 'k' or consumer group 'g'"), TopicNotFoundError),
        (
            rx.ResponseError(
                "Command # 1 (XCLAIM k g c 0 0-1) of pipeline caused error: NOGROUP No such key"
            ),
            TopicNotFoundError,
        ),
        (rx.ResponseError("ERR The ID specified in XADD is equal or smaller"), BrokerError),
        (rx.OutOfMemoryError("OOM command not allowed"), BrokerError),
        (rx.NoScriptError("NOSCRIPT No matching script"), BrokerError),
        (rx.DataError("Invalid input of type: 'dict'"), BrokerError),
    ],
    ids=lambda value: type(value).__name__,
)
def test_specific_mappings(exc: BaseException, expected: type[InfeedError]) -> None:
    error = raise_through(_map_errors(WHERE), exc, WHERE)
    assert isinstance(error, expected)
    if expected is BrokerError:
        assert type(error) is BrokerError


def test_infeed_errors_and_unrelated_errors_pass_through() -> None:
    assert_passes_through(_map_errors, WHERE)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_unreachable_server_fails_after_bounded_retries_naming_the_url() -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        connect(f"redis://127.0.0.1:{port}/0?reconnect_attempts=3&reconnect_backoff_s=0.01")
    assert f"redis://127.0.0.1:{port}/0" in str(info.value)
    assert "after 3 reconnect attempts" in str(info.value)
    assert isinstance(info.value.__cause__, rx.ConnectionError)
    assert time.monotonic() - started < 10


def test_url_options_become_a_frozen_config() -> None:
    with pytest.raises(ConfigError, match="reconnect_attempts"):
        RedisBroker.from_url("redis://127.0.0.1:1/0?reconnect_attempt=3")
    with pytest.raises(ConfigError, match="port"):
        RedisBroker.from_url("redis://127.0.0.1:notaport/0")
    with pytest.raises(ConfigError, match="database"):
        RedisBroker.from_url("redis://127.0.0.1:1/zero")
    with pytest.raises(ConfigError, match="poll_s"):
        RedisBroker.from_url("redis://127.0.0.1:1/0?poll_s=20&socket_timeout_s=10")
    config = RedisConfig(host="h", port=1, db=2, password="s3cret", ack_timeout_s=5)
    assert "s3cret" not in repr(config)
    assert config.url == "redis://h:1/2"
    with pytest.raises(AttributeError):
        config.port = 2  # type: ignore[misc]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_stream_ids_pack_losslessly_in_order(ms: int, seq: int) -> None:
    entry_id = f"{ms}-{seq}"
    offset = wire.id_to_offset(entry_id.encode())
    assert wire.offset_to_id(offset) == entry_id
    assert wire.id_to_offset(wire.offset_to_id(offset + 1)) == offset + 1
    assert wire.id_before(offset + 1) == entry_id
    if seq < 2**64 - 1:
        assert wire.id_to_offset(f"{ms}-{seq + 1}") > offset
    if ms < 2**64 - 1:
        assert wire.id_to_offset(f"{ms + 1}-0") > offset
    assert wire.id_before(0) == "0-0"


@given(
    st.binary(max_size=64),
    st.one_of(st.none(), st.binary(max_size=16)),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
def test_entry_fields_round_trip(payload: bytes, key: bytes | None, headers: dict[str, str]) -> None:
    fields = [b"t", b"1700000000123", *wire.encode_fields(payload, key, headers)]
    assert wire.decode_fields(fields) == (payload, key, headers, 1700000000.123)
