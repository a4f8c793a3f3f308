"""``Producer``: encode records (optionally into record batches) and publish them in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from infeed.brokers.base import Broker, Message
from infeed.codecs import Codec, MsgpackCodec, RecordBatch, Schema, encode_message

__all__ = ["DEFAULT_MESSAGES_PER_PUBLISH", "Producer"]

#: Messages handed to the broker per ``publish_many`` call (one transaction / pipeline).
DEFAULT_MESSAGES_PER_PUBLISH = 200

KeyFn = Callable[[Mapping[str, Any]], bytes | str | None]


class Producer:
    """Publishes records to one topic.

    With ``records_per_message > 1`` records are packed into record batches (stored column by
    column): the way training data should travel, since one message per sample costs more CPU than
    training the sample (BENCHMARKS.md). Messages are published ``messages_per_publish`` at a time;
    ``flush()`` (or leaving the ``with`` block) publishes what is buffered.

    Args:
        broker: where to publish.
        topic: the topic.
        codec: how records become bytes (default msgpack).
        schema: if given, every record is validated (and cast) before it is sent.
        records_per_message: records per message; 1 sends plain records.
        messages_per_publish: messages per broker call.
        key: record -> partitioning key; only with ``records_per_message == 1``.
    """

    def __init__(
        self,
        broker: Broker,
        topic: str,
        *,
        codec: Codec | None = None,
        schema: Schema | None = None,
        records_per_message: int = 1,
        messages_per_publish: int = DEFAULT_MESSAGES_PER_PUBLISH,
        key: KeyFn | None = None,
    ) -> None:
        if records_per_message < 1:
            raise ValueError(f"records_per_message must be >= 1, got {records_per_message}")
        if messages_per_publish < 1:
            raise ValueError(f"messages_per_publish must be >= 1, got {messages_per_publish}")
        if key is not None and records_per_message != 1:
            raise ValueError("key= needs records_per_message=1: a batch message has one key")
        self.broker = broker
        self.topic = topic
        self.codec: Codec = codec or MsgpackCodec()
        self.schema = schema
        self.records_per_message = records_per_message
        self.messages_per_publish = messages_per_publish
        self._key = key
        self._records: list[Mapping[str, Any]] = []
        self._messages: list[Message] = []
        self._pending_records = 0
        #: Records handed to the broker so far.
        self.records_sent = 0
        #: Messages handed to the broker so far.
        self.messages_sent = 0
        #: Payload bytes handed to the broker so far.
        self.bytes_sent = 0

    def send(self, record: Mapping[str, Any]) -> None:
        """Buffer one record; publishes when a batch of messages is full.

        Raises:
            SchemaError: the record does not match ``schema`` (nothing buffered).
            EncodeError: the record cannot be encoded.
        """
        if self.schema is not None:
            record = self.schema.validate(record)
        if self.records_per_message == 1:
            self._add(record, 1)
            return
        self._records.append(record)
        if len(self._records) >= self.records_per_message:
            self._pack()

    def send_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """``send`` each record."""
        for record in records:
            self.send(record)

    def send_batch(self, batch: RecordBatch) -> None:
        """Send a record batch, split into messages of ``records_per_message`` records."""
        if self.schema is not None:
            batch = self.schema.validate_batch(batch)
        if self._records:
            self._pack()
        step = self.records_per_message
        for start in range(0, len(batch), step):
            part = batch.slice(start, start + step)
            if step == 1:
                self._add(part.record(0), 1)
            else:
                self._add(part, len(part))

    def flush(self) -> None:
        """Publish everything buffered, including a partial record batch."""
        if self._records:
            self._pack()
        if self._messages:
            self.broker.publish_many(self.topic, self._messages)
            self.messages_sent += len(self._messages)
            self.bytes_sent += sum(len(m.payload) for m in self._messages)
            self.records_sent += self._pending_records
            self._messages, self._pending_records = [], 0

    def _pack(self) -> None:
        records, self._records = self._records, []
        batch = RecordBatch.from_records(records)
        self._add(batch, len(batch))

    def _add(self, item: Mapping[str, Any] | RecordBatch, count: int) -> None:
        payload, headers = encode_message(self.codec, item)
        key = self._key(item) if self._key is not None and not isinstance(item, RecordBatch) else None
        self._messages.append(Message(payload, key, headers))
        self._pending_records += count
        if len(self._messages) >= self.messages_per_publish:
            self.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
