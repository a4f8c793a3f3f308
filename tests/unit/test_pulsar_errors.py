"""The pulsar:// backend's one error boundary, its URL options, offsets and keys (no broker)."""

from __future__ import annotations

import inspect
import io
import socket
import urllib.error
from email.message import Message as EmailMessage

import _pulsar
import pulsar
import pulsar.exceptions as px
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infeed.brokers import connect
from infeed.brokers._pulsar_admin import entries_from, extent
from infeed.brokers._pulsar_leases import DeliveryCounts
from infeed.brokers._pulsar_wire import (
    KEY_PROPERTY,
    AdminHTTPError,
    Retry,
    decode_key,
    encode_key,
    pack,
    raise_result,
    retryable,
    unpack,
)
from infeed.brokers._url import parse_options
from infeed.brokers.pulsar import PulsarConfig, _map_errors
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    ConsumerClosedError,
    InfeedError,
    PayloadTooLargeError,
    TopicNotFoundError,
    UnsupportedOperationError,
)

WHERE = "pulsar://127.0.0.1:6650"

CLIENT_EXCEPTIONS = sorted(
    {
        cls
        for module in (px, _pulsar)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException)
    },
    key=lambda cls: f"{cls.__module__}.{cls.__name__}",
)
RESULTS = [r for name, r in vars(_pulsar.Result).items() if isinstance(r, _pulsar.Result) and name != "Ok"]


def test_the_walk_finds_the_client_exceptions() -> None:
    names = {cls.__name__ for cls in CLIENT_EXCEPTIONS}
    assert {"PulsarException", "Timeout", "ConnectError", "TopicNotFound", "MessageTooBig"} <= names
    assert len(CLIENT_EXCEPTIONS) > 40


@pytest.mark.parametrize("cls", CLIENT_EXCEPTIONS, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_client_exception_maps_into_the_tree(cls: type[BaseException]) -> None:
    exc = cls("boom")
    with pytest.raises(InfeedError) as info, _map_errors(WHERE):
        raise exc
    assert info.value.__cause__ is exc
    assert WHERE in str(info.value)


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: r.name)
def test_every_async_result_maps_into_the_tree(result: _pulsar.Result) -> None:
    with pytest.raises(InfeedError) as info, _map_errors(WHERE):
        raise_result(result)
    assert isinstance(info.value.__cause__, px.PulsarException)
    assert result.name in str(info.value)


def test_ok_result_raises_nothing() -> None:
    raise_result(pulsar.Result.Ok)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (px.ConnectError("refused"), BrokerConnectionError),
        (px.NotConnected("down"), BrokerConnectionError),
        (px.ServiceUnitNotReady("bundle moving"), BrokerConnectionError),
        (px.AuthenticationError("bad token"), BrokerConnectionError),
        (px.Timeout("slow"), BrokerTimeoutError),
        (px.TopicNotFound("gone"), TopicNotFoundError),
        (px.SubscriptionNotFound("gone"), TopicNotFoundError),
        (px.MessageTooBig("5 MiB"), PayloadTooLargeError),
        (px.InvalidTopicName("a b"), ConfigError),
        (px.CumulativeAcknowledgementNotAllowedError("shared"), UnsupportedOperationError),
        (px.AlreadyClosed("closed"), ConsumerClosedError),
        (px.BrokerPersistenceError("bookie"), BrokerError),
        (px.UnknownError("?"), BrokerError),
    ],
)
def test_mapping_table(exc: Exception, expected: type[InfeedError]) -> None:
    with pytest.raises(expected), _map_errors(WHERE):
        raise exc


def _http_error(code: int, body: bytes = b"{}") -> urllib.error.HTTPError:
    return urllib.error.HTTPError(
        "http://127.0.0.1:8080/admin/v2/x", code, "why", EmailMessage(), io.BytesIO(body)
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_http_error(404), TopicNotFoundError),
        (_http_error(409), AdminHTTPError),
        (_http_error(412), AdminHTTPError),
        (_http_error(503), BrokerConnectionError),
        (_http_error(500, b'{"reason":"Not enough non-faulty bookies available"}'), BrokerConnectionError),
        (_http_error(500, b'{"reason":"NullPointerException"}'), AdminHTTPError),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), BrokerConnectionError),
        (ConnectionResetError(104, "reset"), BrokerConnectionError),
        (TimeoutError("timed out"), BrokerTimeoutError),
    ],
)
def test_admin_api_errors_map_into_the_tree(exc: Exception, expected: type[InfeedError]) -> None:
    with pytest.raises(expected) as info, _map_errors(WHERE):
        raise exc
    assert info.value.__cause__ is exc


def test_http_conflict_keeps_its_status() -> None:
    with pytest.raises(AdminHTTPError) as info, _map_errors(WHERE):
        raise _http_error(409)
    assert info.value.status == 409


def test_retryable_results() -> None:
    assert retryable(pulsar.Result.Timeout)
    assert retryable(pulsar.Result.NotConnected)
    assert not retryable(pulsar.Result.MessageTooBig)
    assert not retryable(pulsar.Result.TopicNotFound)


# -- offsets ------------------------------------------------------------------------------------

LEDGERS = st.integers(min_value=0, max_value=2**63 - 1)
ENTRIES = st.integers(min_value=0, max_value=2**44 - 1)
BATCHES = st.integers(min_value=-1, max_value=2**20 - 1)


@given(LEDGERS, ENTRIES, BATCHES)
def test_offsets_pack_losslessly(ledger: int, entry: int, batch: int) -> None:
    assert unpack(pack(ledger, entry, batch)) == (ledger, entry, max(batch, 0))


@given(st.tuples(LEDGERS, ENTRIES, BATCHES), st.tuples(LEDGERS, ENTRIES, BATCHES))
def test_offsets_keep_message_id_order(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    def key(m: tuple[int, int, int]) -> tuple[int, int, int]:
        return (m[0], m[1], max(m[2], 0))

    assert (pack(*a) < pack(*b)) == (key(a) < key(b))


def test_next_position_of_a_single_message_is_before_the_next_entry() -> None:
    assert pack(7, 3, -1) < pack(7, 3, -1) + 1 < pack(7, 4, -1) < pack(8, 0, -1)


def test_ids_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(-1, 0, 0)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(1, 2**44, 0)


# -- keys ---------------------------------------------------------------------------------------


@given(
    st.one_of(st.none(), st.binary(max_size=64)), st.dictionaries(st.text(max_size=5), st.text(max_size=5))
)
def test_keys_round_trip(key: bytes | None, headers: dict[str, str]) -> None:
    headers.pop(KEY_PROPERTY, None)
    props = dict(headers)
    partition_key = encode_key(key, props)
    assert decode_key(partition_key or "", props) == key
    assert props == headers  # the marker never reaches the caller


def test_utf8_keys_travel_as_partition_keys() -> None:
    props: dict[str, str] = {}
    assert encode_key(b"k\x00", props) == "k\x00"
    assert props == {}
    assert encode_key(b"\xff", props) == "/w=="
    assert props == {KEY_PROPERTY: "/w=="}


# -- config -------------------------------------------------------------------------------------


def _config(query: str = "") -> PulsarConfig:
    return parse_options(
        query, PulsarConfig, service_url="pulsar://127.0.0.1:6650", admin_url="http://127.0.0.1:8080"
    )


def test_options_parse_with_defaults() -> None:
    cfg = _config(
        "ack_timeout_s=1&subscription_type=failover&batching=true&retention_max_age_s=3600&max_deliveries=3"
    )
    assert cfg.ack_timeout_s == 1.0
    assert cfg.max_deliveries == 3
    assert _config().max_deliveries == 0  # no dead-letter policy unless asked
    assert cfg.subscription_type == "failover"
    assert cfg.batching is True
    assert cfg.retention_max_age_s == 3600.0
    assert cfg.max_payload_bytes < 5 * 1024 * 1024  # the broker's default maxMessageSize


@pytest.mark.parametrize(
    "query",
    [
        "ack_timout_s=1",
        "subscription_type=exclusive",
        "receiver_queue_size=0",
        "namespace=public",
        "batching_max_messages=2000000",
        "reconnect_attempts=-1",
        "max_deliveries=-1",
        "admin_url=ftp://x",
    ],
)
def test_bad_options_are_config_errors(query: str) -> None:
    with pytest.raises(ConfigError):
        _config(query)


@pytest.mark.parametrize("url", ["pulsar://", "pulsar://h:1/path", "http://h:1", "pulsar://h:1?admin_url=x"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        connect(url)


def test_unreachable_admin_api_names_the_url_after_the_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"pulsar://127.0.0.1:1?admin_url=http://127.0.0.1:{port}&reconnect_attempts=2&reconnect_backoff_s=0.01"
    with pytest.raises(BrokerConnectionError, match=f"127.0.0.1:{port}"):
        connect(url)


def test_retry_backoff_doubles_up_to_the_cap() -> None:
    retry = Retry(5, 0.1, 0.3)
    assert list(retry.delays()) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert retry.budget_s == pytest.approx(1.2)


# -- describe helpers and delivery counts -------------------------------------------------------


def test_extent_and_lag_from_internal_stats() -> None:
    stats = {
        "lastConfirmedEntry": "12:4",
        "numberOfEntries": 8,
        "currentLedgerEntries": 5,
        "ledgers": [{"ledgerId": 9, "entries": 3}, {"ledgerId": 12, "entries": 0}],
    }
    info, ledgers = extent(0, stats)
    assert ledgers == [(9, 3), (12, 5)]
    # one past the last message (entry 12:4), as a reader at the end sees it: offset + 1
    assert (info.low, info.high, info.depth) == (pack(9, 0, 0), pack(12, 4, 0) + 1, 8)
    assert entries_from(ledgers, pack(9, 1, 0)) == 7
    assert entries_from(ledgers, pack(9, 1, 0) + 1) == 6  # the next position after entry 9:1
    assert entries_from(ledgers, pack(9, 3, 0)) == 5  # past the end of a closed ledger
    assert entries_from(ledgers, info.high) == 0


def test_extent_high_counts_the_last_batch_and_looks_past_an_empty_new_ledger() -> None:
    stats = {"lastConfirmedEntry": "7:2", "numberOfEntries": 3, "ledgers": [{"ledgerId": 7}]}
    info, _ = extent(0, stats, lambda ledger, entry: 10 if (ledger, entry) == (7, 2) else 1)
    assert info.high == pack(7, 2, 9) + 1  # the batch's last message is at index 9
    rolled = {
        "lastConfirmedEntry": "8:-1",  # a new ledger holds nothing yet
        "numberOfEntries": 3,
        "ledgers": [{"ledgerId": 7, "entries": 3}, {"ledgerId": 8, "entries": 0}],
    }
    info, _ = extent(0, rolled)
    assert (info.low, info.high) == (pack(7, 0, 0), pack(7, 2, 0) + 1)


def test_empty_partitionextent() -> None:
    info, _ = extent(1, {"lastConfirmedEntry": "20:-1", "numberOfEntries": 0, "ledgers": [{"ledgerId": 20}]})
    assert info.low == info.high == pack(20, 0, 0)
    assert info.depth == 0


def test_delivery_counts_take_the_larger_memory() -> None:
    counts = DeliveryCounts(limit=2)
    key = ("t", "g", 0, 5)
    assert not counts
    assert counts.count(key, 0) == 1  # nothing given back: Pulsar's count
    counts.remember([(key, 1)])  # the lease ended unsettled (close, expiry, nack)
    assert counts
    assert counts.count(key, 0) == 2  # delivered again: Pulsar did not count a close
    assert counts.count(key, 0) == 1  # taken: the next lease remembers it again if need be
    counts.remember([(key, 3)])
    assert counts.count(key, 4) == 5  # Pulsar counted more (nacks in other processes)
    counts.remember([(key, 1)])
    counts.forget_from("t", "g", 0, 5)  # a seek replays it as new
    assert counts.count(key, 0) == 1
    counts.remember([(key, 1), (("t", "g", 0, 6), 1), (("t", "g", 0, 7), 1)])  # over the limit
    assert counts.count(key, 0) == 1  # the oldest was forgotten
