"""The ``kafka://`` backend's one error boundary, and the link-health record its clients share."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.cimpl import ConcurrentModificationException, IllegalStateException

from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    InfeedError,
    LeaseLostError,
    PayloadTooLargeError,
    TopicNotFoundError,
)

__all__ = ["FENCED", "Link", "error_for", "map_errors", "retriable"]

T = TypeVar("T")
#: Shortest timeout one attempt of a retried request gets, however little budget is left.
_MIN_ATTEMPT_S = 0.5

_log = logging.getLogger("infeed.brokers.kafka")

#: The broker cannot be reached, or the partition/coordinator has no leader right now.
_UNREACHABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._DESTROY,
        KafkaError._WAIT_COORD,
        KafkaError._SSL,
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        # a partition's leadership is moving (a node died or came back): wait and ask again
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.PREFERRED_LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.NOT_CONTROLLER,
        KafkaError._NODE_UPDATE,
    }
)
_TIMEOUT = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
    }
)
_NO_TOPIC = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_ID,
    }
)
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
#: The group moved on without this member: its partitions (and leases) are someone else's.
FENCED = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.STALE_MEMBER_EPOCH,
        KafkaError.FENCED_MEMBER_EPOCH,
        KafkaError._ASSIGNMENT_LOST,
    }
)


def retriable(err: KafkaError) -> bool:
    """Whether trying again later can succeed (the link or a leader is down, or it timed out)."""
    code = err.code()
    if err.fatal() or code in FENCED:  # a rebalance needs this member to poll, not to wait
        return False
    return code in _UNREACHABLE or code in _TIMEOUT or bool(err.retriable())


def error_for(err: KafkaError, where: str, doing: str = "") -> InfeedError:
    """Return the infeed error for a librdkafka error (``doing`` says what failed)."""
    code = err.code()
    what = f"{where}: {doing + ': ' if doing else ''}{err.str()} ({err.name()})"
    if code in _UNREACHABLE:
        return BrokerConnectionError(f"cannot reach {what}")
    if code in _TIMEOUT:
        return BrokerTimeoutError(f"no answer in time from {what}")
    if code in _NO_TOPIC:
        return TopicNotFoundError(f"no such topic or partition on {what}")
    if code in _TOO_LARGE:
        return PayloadTooLargeError(f"the message is over the broker's size limit on {what}")
    if code in FENCED:
        return LeaseLostError(f"this member lost its partitions to a rebalance on {what}")
    return BrokerError(what)


@contextlib.contextmanager
def map_errors(where: str, doing: str = "") -> Iterator[None]:
    """Translate confluent-kafka's exceptions into the infeed error tree (``raise ... from``)."""
    try:
        yield
    except InfeedError:
        raise
    except KafkaException as exc:
        arg = exc.args[0] if exc.args else None
        if isinstance(arg, KafkaError):
            raise error_for(arg, where, doing) from exc
        raise BrokerError(f"{where}: {doing + ': ' if doing else ''}{exc}") from exc
    except (IllegalStateException, ConcurrentModificationException) as exc:
        raise BrokerError(f"{where}: the Kafka client was misused ({type(exc).__name__}: {exc})") from exc
    except TimeoutError as exc:  # concurrent.futures of the admin client
        raise BrokerTimeoutError(f"no answer in time from {where}{': ' + doing if doing else ''}") from exc


class Link:
    """When the clients of one broker object last lost (and regained) the broker.

    librdkafka reconnects on its own with exponential backoff; ``error_cb`` tells us when every
    broker connection is down. An operation that finds the link down for longer than the
    reconnect budget raises ``BrokerConnectionError`` naming the URL.
    """

    def __init__(
        self,
        where: str,
        budget_s: float,
        attempts: int,
        *,
        backoff_s: float = 0.1,
        backoff_max_s: float = 10.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.where = where
        self.budget_s = budget_s
        self.attempts = attempts
        self._backoff = (backoff_s, backoff_max_s)
        self._request_timeout_s = request_timeout_s
        self._down_since: float | None = None
        self._last: KafkaError | None = None
        self._fatal: KafkaError | None = None
        self._lock = threading.Lock()

    def on_error(self, err: KafkaError) -> None:
        """``error_cb`` of every client: note outages and fatal errors."""
        with self._lock:
            if err.fatal():
                self._fatal = err
            if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
                if self._down_since is None:
                    self._down_since = time.monotonic()
                self._last = err
        _log.debug("kafka client error on %s: %s", self.where, err)

    def up(self) -> None:
        """Something came back from the broker: the link works."""
        if self._down_since is not None:
            with self._lock:
                self._down_since = None

    @property
    def down(self) -> bool:
        """Whether an outage was seen and not yet cleared."""
        return self._down_since is not None

    def check_fatal(self) -> None:
        """Raise if a client hit a fatal error (e.g. the idempotent producer was fenced)."""
        fatal = self._fatal
        if fatal is not None:
            raise BrokerError(f"{self.where}: fatal Kafka client error: {fatal.str()} ({fatal.name()})")

    def check(self) -> None:
        """Raise if the client hit a fatal error, or the broker has been gone past the budget."""
        with self._lock:
            fatal, since, last = self._fatal, self._down_since, self._last
        if fatal is not None:
            raise BrokerError(f"{self.where}: fatal Kafka client error: {fatal.str()} ({fatal.name()})")
        if since is not None and time.monotonic() - since > self.budget_s:
            raise self.gone(last)

    def gone(self, last: KafkaError | None = None) -> BrokerConnectionError:
        """The error for a broker still unreachable after the reconnect attempts."""
        cause = f": {last.str()}" if last is not None else ""
        return BrokerConnectionError(
            f"cannot reach {self.where} after {self.attempts} reconnect attempts "
            f"({self.budget_s:.1f} s){cause}"
        )

    def retry(self, doing: str, fn: Callable[[float], T]) -> T:
        """Run ``fn(timeout_s)``; on errors that may pass (outage, leader move) try again.

        Each attempt gets the request timeout, cut to what is left of the reconnect budget, so
        the whole call gives up after about the budget.

        Raises:
            BrokerConnectionError: still failing after the budget (naming the URL).
            InfeedError: the mapped error of anything that will not pass by waiting.
        """
        deadline = time.monotonic() + self.budget_s
        delay, delay_max = self._backoff
        while True:
            left = deadline - time.monotonic()
            try:
                return fn(max(_MIN_ATTEMPT_S, min(self._request_timeout_s, left)))
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None or not retriable(err):
                    with map_errors(self.where, doing):
                        raise
                if time.monotonic() >= deadline:
                    raise self.gone(err) from exc
            except TimeoutError as exc:  # an admin future that did not complete
                if time.monotonic() >= deadline:
                    raise self.gone() from exc
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, delay_max)
