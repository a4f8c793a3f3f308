"""What ``pulsar://`` puts on the wire: the error boundary, offsets packed from message ids, keys.

* ``_map_errors`` is the one place where pulsar-client's exceptions (and the admin API's HTTP
  errors) become infeed errors; ``raise_result`` turns the ``Result`` of an async callback into
  the matching pulsar-client exception first, so it takes the same path.
* A message id ``(ledger, entry, batch_index)`` packs into one integer offset,
  ``ledger << 64 | entry << 20 | max(batch_index, 0)``: lossless (entry ids stay below 2**44,
  batch indexes below 2**20) and ordered like the ids (ledger ids grow within a topic). A message
  that is not in a batch has batch index -1 and packs like index 0; an entry is either a batch or
  one message, so no two messages share an offset.
* Keys are bytes in infeed and strings in Pulsar: a key that is UTF-8 travels as Pulsar's
  partition key (so Key_Shared subscriptions and other clients see it); any other key travels
  base64-encoded with a marker property that ``decode_key`` removes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import http.client
import logging
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pulsar
import pulsar.exceptions as px

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

__all__ = [
    "BATCH_BITS",
    "KEY_PROPERTY",
    "RETRYABLE",
    "AdminHTTPError",
    "Receipts",
    "Retry",
    "decode_key",
    "encode_key",
    "pack",
    "raise_result",
    "retryable",
    "retrying",
    "unpack",
]

T = TypeVar("T")
_log = logging.getLogger("infeed.brokers.pulsar")

#: Low bits of an offset that hold the batch index.
BATCH_BITS = 20
_ENTRY_BITS = 64 - BATCH_BITS
_BATCH_MASK = (1 << BATCH_BITS) - 1
_ENTRY_MASK = (1 << _ENTRY_BITS) - 1
#: Property marking a key that is not UTF-8 (its value: the key in base64).
KEY_PROPERTY = "x-infeed-key-b64"

_CONNECTION = (
    px.ConnectError,
    px.NotConnected,
    px.LookupError,
    px.ServiceUnitNotReady,
    px.TooManyLookupRequestException,
    px.ReadError,
    px.AuthenticationError,
    px.AuthorizationError,
    px.ErrorGettingAuthenticationData,
    px.UnsupportedVersionError,
)
_CONFIG = (
    px.InvalidConfiguration,
    px.InvalidTopicName,
    px.InvalidUrl,
    px.IncompatibleSchema,
    px.CryptoError,
)
_UNSUPPORTED = (px.OperationNotSupported, px.CumulativeAcknowledgementNotAllowedError, px.NotAllowedError)
_CLOSED = (px.AlreadyClosed, px.ConsumerNotInitialized, px.ProducerNotInitialized)
#: What the admin API says in an HTTP 500 while its bookie or metadata store is coming back.
_RECOVERING = (
    "ManagedLedgerException",
    "non-faulty bookies",
    "ServiceUnitNotReady",
    "MetadataStoreException",
)
#: Failures a retry after reconnecting may cure.
RETRYABLE = (*_CONNECTION, px.Timeout, px.AlreadyClosed, px.ProducerQueueIsFull, px.MemoryBufferIsFull)


class AdminHTTPError(BrokerError):
    """The admin REST API answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def _map_errors(where: str) -> Iterator[None]:
    """Translate pulsar-client and admin-API (HTTP) exceptions into the infeed error tree."""
    try:
        yield
    except InfeedError:
        raise
    except px.Timeout as exc:
        raise BrokerTimeoutError(f"{where} did not answer in time: {exc}") from exc
    except _CONNECTION as exc:
        raise BrokerConnectionError(f"cannot reach {where}: {type(exc).__name__}: {exc}") from exc
    except (px.TopicNotFound, px.SubscriptionNotFound, px.ConsumerNotFound, px.TopicTerminated) as exc:
        raise TopicNotFoundError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except px.MessageTooBig as exc:
        raise PayloadTooLargeError(f"{where} refused a message as too big: {exc}") from exc
    except _CONFIG as exc:
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except _UNSUPPORTED as exc:
        raise UnsupportedOperationError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except _CLOSED as exc:
        raise ConsumerClosedError(f"{where}: used after close ({type(exc).__name__}: {exc})") from exc
    except px.PulsarException as exc:
        raise BrokerError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    except urllib.error.HTTPError as exc:
        raise _http_error(where, exc) from exc
    except TimeoutError as exc:
        raise BrokerTimeoutError(f"the admin API of {where} did not answer in time: {exc}") from exc
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
        raise BrokerConnectionError(f"cannot reach the admin API of {where}: {exc}") from exc


def _http_error(where: str, exc: urllib.error.HTTPError) -> BrokerError:
    try:
        body = exc.read().decode("utf-8", "replace")[:300]
    except (OSError, http.client.HTTPException):
        body = ""
    text = f"{where} admin API: HTTP {exc.code} {exc.reason} on {exc.url}: {body}"
    if exc.code == 404:
        return TopicNotFoundError(text)
    if exc.code in (502, 503, 504) or (exc.code == 500 and any(m in body for m in _RECOVERING)):
        return BrokerConnectionError(text)  # retried: the broker or its storage is (re)starting
    return AdminHTTPError(text, exc.code)


def raise_result(result: Any) -> None:
    """Raise the pulsar-client exception named by an async callback's ``Result`` (unless Ok)."""
    if result == pulsar.Result.Ok:
        return
    cls = getattr(px, result.name, px.UnknownError)
    raise cls(f"Pulsar error: {result.name}")


def pack(ledger: int, entry: int, batch_index: int) -> int:
    """Pack a message id into one offset (see the module docstring)."""
    if ledger < 0 or not 0 <= entry <= _ENTRY_MASK or batch_index > _BATCH_MASK:
        raise ValueError(f"message id ({ledger}, {entry}, {batch_index}) cannot be packed")
    return ledger << 64 | entry << BATCH_BITS | max(batch_index, 0)


def unpack(offset: int) -> tuple[int, int, int]:
    """Return ``(ledger, entry, batch_index)`` of an offset (batch index 0 also means "no batch")."""
    return offset >> 64, (offset >> BATCH_BITS) & _ENTRY_MASK, offset & _BATCH_MASK


def encode_key(key: bytes | None, properties: dict[str, str]) -> str | None:
    """Return the partition key for ``key``; a key that is not UTF-8 also sets the marker property."""
    if key is None:
        return None
    if key:  # an empty key is no key to Pulsar: it travels in the marker alone
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            pass
    text = base64.b64encode(key).decode("ascii")
    properties[KEY_PROPERTY] = text
    return text or None


def decode_key(partition_key: str, properties: dict[str, str]) -> bytes | None:
    """Return the infeed key of a message, removing the marker property from ``properties``."""
    marked = properties.pop(KEY_PROPERTY, None)
    if marked is not None:
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(marked, validate=True)
    return partition_key.encode("utf-8") if partition_key else None


class Retry:
    """Bounded retries with exponential backoff: ``attempts`` waits of ``backoff_s``, doubling up to a cap."""

    def __init__(self, attempts: int, backoff_s: float, backoff_max_s: float) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s

    def delays(self) -> Iterator[float]:
        """The waits before each retry."""
        delay = self.backoff_s
        for _ in range(self.attempts):
            yield min(delay, self.backoff_max_s)
            delay *= 2

    @property
    def budget_s(self) -> float:
        """All the waits together: how long an outage may last before operations give up."""
        return sum(self.delays())


def retrying(retry: Retry, url: str, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, again after each backoff wait while it fails to reach the broker.

    Raises:
        BrokerConnectionError: naming ``url``, once the retries are spent.
    """
    delays = retry.delays()
    while True:
        try:
            return fn()
        except (BrokerConnectionError, BrokerTimeoutError) as exc:
            delay = next(delays, None)
            if delay is None:
                raise BrokerConnectionError(
                    f"{what}: {url} is still unreachable after {retry.attempts} reconnect attempts "
                    f"over {retry.budget_s:.1f}s (reconnect_attempts, reconnect_backoff_s): {exc}"
                ) from exc
            _log.warning("%s: %s; retrying in %.2fs", what, exc, delay)
            time.sleep(delay)


class Receipts:
    """Results of async sends, by position in the batch; ``wait`` returns once all came back."""

    def __init__(self, n: int) -> None:
        self.results: list[Any] = [None] * n
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        if n == 0:
            self._done.set()

    def callback(self, i: int) -> Any:
        return functools.partial(self._record, i)

    def _record(self, i: int, result: Any, _msg_id: Any) -> None:
        self.results[i] = result
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def wait(self, timeout_s: float) -> None:
        if not self._done.wait(timeout_s):
            raise BrokerConnectionError(f"{self._left} sends got no receipt within {timeout_s:.0f}s")


def retryable(result: Any) -> bool:
    return any(result.name == cls.__name__ for cls in RETRYABLE)
