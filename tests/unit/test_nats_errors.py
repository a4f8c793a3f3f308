"""The nats:// backend's one error boundary, URL options, names and headers (no server)."""

from __future__ import annotations

import inspect
import socket
from types import ModuleType

import nats.aio.errors
import nats.errors
import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infeed.brokers import _nats_link as link
from infeed.brokers import connect
from infeed.brokers.nats import NATSConfig, _map_errors
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    InfeedError,
    PayloadTooLargeError,
    TopicNotFoundError,
)
from tests.unit.error_mapping import (
    assert_passes_through,
    client_exceptions,
    exception_id,
    raise_through,
)

WHERE = "nats://127.0.0.1:4222"
MODULES: tuple[ModuleType, ...] = (nats.errors, nats.js.errors, nats.aio.errors)

CLIENT_EXCEPTIONS = client_exceptions(MODULES, ("nats",))


def _build(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` whatever its constructor wants (SlowConsumerError wants four)."""
    try:
        return cls()
    except TypeError:
        params = inspect.signature(cls).parameters
        return cls(*[None for p in params.values() if p.default is inspect.Parameter.empty])


def test_the_walk_finds_the_client_exceptions() -> None:
    names = {cls.__name__ for cls in CLIENT_EXCEPTIONS}
    assert {"Error", "TimeoutError", "NoServersError", "APIError", "NotFoundError", "ErrTimeout"} <= names
    assert len(CLIENT_EXCEPTIONS) > 50


@pytest.mark.parametrize("cls", CLIENT_EXCEPTIONS, ids=exception_id)
def test_every_client_exception_maps_into_the_tree(cls: type[BaseException]) -> None:
    raise_through(_map_errors(WHERE), _build(cls), WHERE)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (nats.errors.MaxPayloadError(), PayloadTooLargeError),
        (
            nats.js.errors.APIError(code=400, err_code=10054, description="message size exceeds"),
            PayloadTooLargeError,
        ),
        (
            nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found"),
            TopicNotFoundError,
        ),
        (
            nats.js.errors.NotFoundError(code=404, err_code=10014, description="consumer not found"),
            BrokerError,
        ),
        (nats.errors.TimeoutError(), BrokerTimeoutError),
        (nats.errors.FlushTimeoutError(), BrokerTimeoutError),
        (TimeoutError("slow"), BrokerTimeoutError),
        (nats.errors.NoServersError(), BrokerConnectionError),
        (nats.errors.ConnectionClosedError(), BrokerConnectionError),
        (nats.errors.NoRespondersError(), BrokerConnectionError),
        (nats.js.errors.ServiceUnavailableError(code=503), BrokerConnectionError),
        (ConnectionRefusedError(111, "refused"), BrokerConnectionError),
        (socket.gaierror("no such host"), BrokerConnectionError),
        (nats.js.errors.BadRequestError(code=400, err_code=10058, description="in use"), BrokerError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_specific_mappings(exc: BaseException, expected: type[InfeedError]) -> None:
    assert type(raise_through(_map_errors(WHERE), exc, WHERE)) is expected


def test_infeed_errors_and_bugs_pass_through_unchanged() -> None:
    assert_passes_through(_map_errors, WHERE)
    with pytest.raises(ValueError, match="a bug"), _map_errors(WHERE):
        raise ValueError("a bug")


# -- URL options ------------------------------------------------------------------------------


def test_options_are_typed_and_checked() -> None:
    with pytest.raises(ConfigError, match="did you mean 'reconnect_attempts'"):
        connect("nats://127.0.0.1:1?reconnect_attempt=3")
    with pytest.raises(ConfigError, match="max_deliver must be -1"):
        connect("nats://127.0.0.1:1?max_deliver=0")
    with pytest.raises(ConfigError, match="storage"):
        connect("nats://127.0.0.1:1?storage=disk")
    with pytest.raises(ConfigError, match="not a NATS URL"):
        connect("nats:///no-host")
    with pytest.raises(ConfigError, match="no path"):
        connect("nats://127.0.0.1:4222/some/path")


def test_config_defaults() -> None:
    cfg = NATSConfig(server=WHERE)
    assert cfg.max_deliver == -1
    assert cfg.reconnect_attempts > 0
    assert cfg.retention_max_age_s is None


def test_unreachable_server_raises_connection_error_naming_the_url() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    with pytest.raises(BrokerConnectionError, match=f"127.0.0.1:{port}"):
        connect(f"{url}?reconnect_attempts=1&reconnect_backoff_s=0.01&request_timeout_s=1")


def test_password_is_not_shown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokerConnectionError) as info:
        connect(f"nats://me:secret@127.0.0.1:{port}?reconnect_attempts=1&reconnect_backoff_s=0.01")
    assert "secret" not in str(info.value)
    assert "me:***@127.0.0.1" in str(info.value)


# -- names and headers ------------------------------------------------------------------------

names = st.text(min_size=1, max_size=40)


@given(names)
def test_escaping_is_reversible_and_yields_one_token(name: str) -> None:
    escaped = link.esc(name)
    assert link.unesc(escaped) == name
    assert set(escaped) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@given(names, st.integers(0, 10_000))
def test_stream_subject_and_durable_names_invert(name: str, partition: int) -> None:
    assert link.topic_of(link.stream_of(name)) == name
    assert link.group_of(link.durable_of(name, partition)) == (name, partition)
    assert link.subject_of(name, partition).rpartition(".")[2] == str(partition)


def test_foreign_streams_and_consumers_are_not_ours() -> None:
    assert link.topic_of("KV_infeed-offsets") is None
    assert link.topic_of("ORDERS") is None
    assert link.group_of("some-push-consumer") is None


def test_topics_that_differ_only_by_dots_get_different_streams() -> None:
    assert link.stream_of("a.b") != link.stream_of("a_b") != link.stream_of("a-b")
    assert link.subject_of("a.b", 0) != link.subject_of("a", 0)


header_maps = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=20), max_size=5)


@given(st.one_of(st.none(), st.binary(max_size=20)), header_maps)
def test_key_and_headers_round_trip(key: bytes | None, headers: dict[str, str]) -> None:
    encoded = link.encode_headers(key, headers)
    assert link.decode_headers(encoded) == (key, headers)
    if encoded is not None:
        block = 12 + sum(len(k) + len(v.encode()) + 4 for k, v in encoded.items())
        assert link.headers_size(encoded) == block


def test_plain_headers_stay_native_for_other_nats_clients() -> None:
    encoded = link.encode_headers(None, {"codec": "msgpack", "odd": " padded ", "Nats-Msg-Id": "x"})
    assert encoded is not None
    assert encoded["codec"] == "msgpack"
    assert "odd" not in encoded and "Nats-Msg-Id" not in encoded  # these travel as JSON
    assert link.encode_headers(None, {}) is None
