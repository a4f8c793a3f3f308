"""``StreamConsumer``: deliveries decoded into record batches; poison dead-lettered, never fatal."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from infeed.brokers.base import Consumer, Message, dead_letter_headers
from infeed.codecs import (
    CODEC_HEADER,
    DEFAULT_CODEC,
    CodecRegistry,
    RecordBatch,
    Schema,
    decode_message,
    default_registry,
    encode_message,
)
from infeed.errors import DecodeError
from infeed.types import Delivery, Position

__all__ = ["Received", "StreamConsumer"]


@dataclass(frozen=True, slots=True)
class Received:
    """One delivery and the valid records it carried (a single record is a batch of one).

    Attributes:
        delivery: the broker delivery.
        batch: the records that passed the schema.
        indices: where each record of ``batch`` stood in the message, when some were
            dead-lettered; ``None`` when the batch is the whole message.
    """

    delivery: Delivery
    batch: RecordBatch
    indices: tuple[int, ...] | None = None

    def index_in_message(self, i: int) -> int:
        """Return the index in the original message of record ``i`` of ``batch``."""
        return i if self.indices is None else self.indices[i]


class StreamConsumer:
    """Receives from a broker consumer and decodes each delivery into a ``RecordBatch``.

    A message that does not decode, or whose records all fail the schema, is dead-lettered with
    the reason (``nack(requeue=False)``). Inside a record batch, only the records that fail the
    schema are dead-lettered — each as its own message, with the reason and the record index in
    its headers — and the rest are returned. Poison never stops the caller.

    Acking and committing stay with the caller: ``ack`` / ``commit`` pass through.

    Args:
        consumer: the broker consumer (owned: ``close`` closes it).
        registry: codecs known to the decoder (default msgpack + json).
        schema: validates and casts every record when given.
    """

    def __init__(
        self,
        consumer: Consumer,
        *,
        registry: CodecRegistry | None = None,
        schema: Schema | None = None,
    ) -> None:
        self.consumer = consumer
        self.registry = registry or default_registry()
        self.schema = schema
        #: Messages and records sent to the dead-letter topic so far.
        self.dead_lettered = 0

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Received]:
        """Receive deliveries and decode them; poison is dead-lettered and left out.

        Returns an empty list when nothing valid arrived before ``timeout_s``.
        """
        out: list[Received] = []
        for delivery in self.consumer.receive(max_messages=max_messages, timeout_s=timeout_s):
            try:
                batch = decode_message(delivery.payload, delivery.headers, self.registry)
            except DecodeError as exc:
                self._dead_letter(delivery, f"undecodable: {exc}")
                continue
            indices = None
            if self.schema is not None:
                valid, invalid = self.schema.split(batch)
                if invalid and len(valid) == 0:
                    index, reason = next(iter(invalid.items()))
                    self._dead_letter(delivery, f"record {index}: {reason}")
                    continue
                if invalid:
                    self._dead_letter_records(delivery, batch, invalid)
                    indices = tuple(i for i in range(len(batch)) if i not in invalid)
                batch = valid
            out.append(Received(delivery, batch, indices))
        return out

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.consumer.nack(delivery, requeue=False, reason=reason)
        self.dead_lettered += 1

    def _dead_letter_records(self, delivery: Delivery, whole: RecordBatch, invalid: dict[int, str]) -> None:
        messages = []
        codec = self.registry.get(delivery.headers.get(CODEC_HEADER, DEFAULT_CODEC))
        for index, reason in invalid.items():
            payload, own = encode_message(codec, whole.take([index]))
            headers = dead_letter_headers(delivery, f"record {index}: {reason}")
            headers.update(own)  # the copy is a batch of one, whatever the original held
            headers["x-infeed-dlq-record"] = str(index)
            messages.append(Message(payload, delivery.key, headers))
        self.consumer.broker.publish_many(self.consumer.dead_letter_topic, messages)
        self.dead_lettered += len(messages)

    def ack(self, items: Received | Delivery | Iterable[Received | Delivery]) -> None:
        """Ack deliveries (``Received`` items are accepted too)."""
        self.consumer.ack(_deliveries(items))

    def commit(self, positions: Position | Iterable[Position]) -> None:
        """Commit resume positions for the group."""
        self.consumer.commit(positions)

    def close(self) -> None:
        """Close the underlying consumer."""
        self.consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _deliveries(items: Received | Delivery | Iterable[Received | Delivery]) -> list[Delivery]:
    if isinstance(items, Received | Delivery):
        items = [items]
    return [i.delivery if isinstance(i, Received) else i for i in items]
