"""The amqp:// backend's one error boundary, its URL options, and its ack bookkeeping (no broker)."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import pytest

from infeed.brokers._rabbitmq_queue import _Acks
from infeed.brokers._rabbitmq_recovery import is_stream_recovering
from infeed.brokers.rabbitmq import RabbitMQBroker, _map_errors
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
    build_exception,
    client_exceptions,
    raise_through,
)

URL = "amqp://guest@127.0.0.1:5672/%2F"

PIKA_EXCEPTIONS = client_exceptions((pika.exceptions,), (pika.exceptions.__name__,))


def test_pika_exports_exceptions() -> None:
    assert len(PIKA_EXCEPTIONS) > 20


@pytest.mark.parametrize("cls", PIKA_EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_every_pika_exception_maps_into_the_tree(cls: type[BaseException]) -> None:
    # pika's constructors want a reply code and text, a list, or nothing
    exc = build_exception(cls, (), (404, "NOT_FOUND - no exchange 't'"), ([],), ("detail",))
    raise_through(_map_errors(URL), exc, URL)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue"), TopicNotFoundError),
        (pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"), BrokerError),
        (pika.exceptions.ChannelClosedByBroker(311, "CONTENT_TOO_LARGE"), PayloadTooLargeError),
        (pika.exceptions.StreamLostError("Stream connection lost"), BrokerConnectionError),
        (pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED"), BrokerConnectionError),
        (pika.exceptions.ConnectionBlockedTimeout(), BrokerTimeoutError),
        (pika.exceptions.AMQPHeartbeatTimeout(), BrokerConnectionError),
        (pika.exceptions.NackError([]), BrokerError),
        (ConnectionRefusedError(111, "Connection refused"), BrokerConnectionError),
    ],
    ids=lambda value: type(value).__name__,
)
def test_specific_mappings(exc: BaseException, expected: type[InfeedError]) -> None:
    assert isinstance(raise_through(_map_errors(URL), exc, URL), expected)


@pytest.mark.parametrize(
    ("exc", "recovering"),
    [
        (
            pika.exceptions.ChannelClosedByBroker(
                404, "NOT_FOUND - home node 'n@h' of durable queue 't' in vhost '/' is down or inaccessible"
            ),
            True,
        ),
        (
            pika.exceptions.ChannelClosedByBroker(
                406, "PRECONDITION_FAILED - queue 't' in vhost '/' does not have a replica on the local node"
            ),
            True,
        ),
        (pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue 't' in vhost '/'"), False),
        (pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"), False),
        (pika.exceptions.StreamLostError("Stream connection lost"), False),
    ],
    ids=["down", "no-replica", "no-queue", "inequivalent", "lost"],
)
def test_a_stream_the_restarted_node_has_not_started_is_retried(exc: BaseException, recovering: bool) -> None:
    assert is_stream_recovering(exc) is recovering


def test_infeed_errors_and_unrelated_errors_pass_through() -> None:
    assert_passes_through(_map_errors, URL)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match="queue_typ"):
        RabbitMQBroker.from_url("amqp://guest:guest@127.0.0.1:1/%2F?queue_typ=quorum")
    with pytest.raises(ConfigError, match="queue_type"):
        RabbitMQBroker.from_url("amqp://127.0.0.1:1/?queue_type=lazy")
    with pytest.raises(ConfigError, match="max_priority"):
        RabbitMQBroker.from_url("amqp://127.0.0.1:1/?queue_type=stream&max_priority=5")
    with pytest.raises(ConfigError):
        RabbitMQBroker.from_url("amqp:///no-host")


def test_unreachable_broker_raises_connection_error_naming_the_url() -> None:
    url = "amqp://guest:secret@127.0.0.1:1/%2F?reconnect_attempts=2&reconnect_backoff_s=0.01"
    with pytest.raises(BrokerConnectionError, match=r"127\.0\.0\.1:1") as info:
        RabbitMQBroker.from_url(url)
    assert "secret" not in str(info.value)
    assert "2 attempts" in str(info.value)


class _FakeChannel:
    is_open = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool, Any]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple, None))

    def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.sent.append(("nack", tag, multiple, requeue))


def test_acks_use_one_multiple_frame_for_a_leading_run() -> None:
    acks, chan = _Acks(), _FakeChannel()
    for tag in range(1, 11):
        acks.delivered(tag)
    acks.settle(chan, [3, 1, 2, 4])
    assert chan.sent == [("ack", 4, True, None)]
    acks.settle(chan, [7, 9])  # 5 and 6 are still out: one frame each, never a multiple over them
    assert chan.sent[1:] == [("ack", 7, False, None), ("ack", 9, False, None)]
    acks.settle(chan, [5, 6, 8], requeue=True)
    assert chan.sent[3:] == [("nack", 8, True, True)]
    acks.settle(chan, [10, 10, 4])  # a tag already settled is never sent again
    assert chan.sent[4:] == [("ack", 10, True, None)]
    assert not acks.unsettled
