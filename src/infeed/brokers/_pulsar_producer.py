"""The sending side of ``pulsar://``: one producer per partition, sends that wait for every receipt.

``Producers`` creates a partition's producer on first use and keeps it until its topic is deleted
or the broker closes. ``send`` sends a chunk of messages asynchronously, waits for every receipt
(the broker has the message in its bookie) and sends the failed ones again with backoff
(at-least-once). A producer whose send failed with ``Timeout`` or ``AlreadyClosed`` is replaced
by a fresh one: after a broker restart a reconnect that timed out can stay stuck.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import _pulsar
import pulsar

from infeed.brokers._pulsar_wire import Receipts, Retry, _map_errors, raise_result, retryable, retrying

if TYPE_CHECKING:
    from infeed.brokers.pulsar import PulsarConfig

__all__ = ["CHUNK", "Item", "Producers"]

#: Sends in flight per wait (below the producer's pending-message limit, so send_async never blocks).
CHUNK = 5000
_MAX_PENDING = 2 * CHUNK
#: One message to send: partition, payload, Pulsar partition key, properties.
Item = tuple[int, bytes, str | None, dict[str, str]]


class Producers:
    """The producers of one client, by ``(topic, partition)``, and sending through them.

    Args:
        client: the ``pulsar.Client``.
        config: the broker's options (timeouts, batching).
        retry: the reconnect attempts and backoff of a send.
        where: the service URL, for error messages.
        partition_name: the full Pulsar topic name of a partition.
    """

    def __init__(
        self,
        client: Any,
        config: PulsarConfig,
        retry: Retry,
        where: str,
        partition_name: Callable[[str, int], str],
    ) -> None:
        self._client = client
        self._cfg = config
        self._retry = retry
        self._where = where
        self._partition_name = partition_name
        self._lock = threading.Lock()
        self._raw: dict[tuple[str, int], Any] = {}  # the raw producers, for the fast path
        self._wrappers: dict[tuple[str, int], Any] = {}

    def send(self, topic: str, items: list[Item]) -> None:
        """Send ``items`` and wait for their receipts; resend the failed ones with backoff.

        Raises:
            BrokerConnectionError: if the broker stays unreachable past the reconnect attempts.
        """
        todo = items
        wait_s = self._cfg.send_timeout_s + self._cfg.operation_timeout_s

        def attempt() -> None:
            nonlocal todo
            results = Receipts(len(todo))
            for i, (partition, payload, partition_key, headers) in enumerate(todo):
                builder = _pulsar.MessageBuilder()  # a message object is spent once sent, even if it failed
                builder.content(payload)
                if partition_key is not None:
                    builder.partition_key(partition_key)
                if headers:
                    builder.properties(headers)
                self._producer(topic, partition).send_async(builder.build(), results.callback(i))
            results.wait(wait_s)
            failed = [
                (item, res)
                for item, res in zip(todo, results.results, strict=True)
                if res != pulsar.Result.Ok
            ]
            if not failed:
                return
            todo = [item for item, _ in failed]
            for (partition, *_), res in failed:
                if res in (pulsar.Result.AlreadyClosed, pulsar.Result.Timeout):
                    # a fresh producer: a reconnect that timed out can stay stuck after a restart
                    self._drop(topic, partition)
            first = next((res for _, res in failed if not retryable(res)), failed[0][1])
            with _map_errors(
                f"{self._where} (topic {topic!r}: {len(failed)} of {len(results.results)} sends)"
            ):
                raise_result(first)

        retrying(self._retry, self._where, f"publish to {topic!r}", attempt)

    def _producer(self, topic: str, partition: int) -> Any:
        """The raw producer of a partition, created on first use (``send`` retries failures)."""
        producer = self._raw.get((topic, partition))
        if producer is not None:
            return producer
        s = self._cfg
        with _map_errors(self._where):
            wrapper = self._client.create_producer(
                self._partition_name(topic, partition),
                send_timeout_millis=max(1, int(s.send_timeout_s * 1000)),
                batching_enabled=s.batching,
                batching_max_messages=s.batching_max_messages,
                batching_max_allowed_size_in_bytes=4 * 1024 * 1024,
                batching_max_publish_delay_ms=max(1, int(s.batching_max_delay_s * 1000)),
                max_pending_messages=_MAX_PENDING,
                block_if_queue_full=True,
            )
        with self._lock:
            existing = self._wrappers.get((topic, partition))
            if existing is None:  # another thread may have created one meanwhile: keep the first
                self._raw[(topic, partition)] = wrapper._producer
                self._wrappers[(topic, partition)] = existing = wrapper
        if existing is not wrapper:
            with contextlib.suppress(pulsar.PulsarException):
                wrapper.close()
        return existing._producer

    def _drop(self, topic: str, partition: int) -> None:
        with self._lock:
            self._raw.pop((topic, partition), None)
            wrapper = self._wrappers.pop((topic, partition), None)
        if wrapper is not None:
            with contextlib.suppress(pulsar.PulsarException):
                wrapper.close()

    def drop_topic(self, topic: str) -> None:
        """Close the producers of ``topic`` (before it is deleted)."""
        with self._lock:
            stale = [k for k in self._wrappers if k[0] == topic]
            for k in stale:
                self._raw.pop(k, None)
            wrappers = [self._wrappers.pop(k) for k in stale]
        _close(wrappers)

    def close(self) -> None:
        """Close every producer (the client is the caller's to close)."""
        with self._lock:
            wrappers = list(self._wrappers.values())
            self._raw.clear()
            self._wrappers.clear()
        _close(wrappers)


def _close(wrappers: list[Any]) -> None:
    for wrapper in wrappers:
        with contextlib.suppress(pulsar.PulsarException):
            wrapper.close()
