"""``Scorer``: topic-to-topic scoring, exactly once in the output topic, across crashes.

Reads records (one per message, or record batches) from an input topic, runs the model on them in
batches (``BatchConfig``, ``run_model``, the worker's machinery) and publishes, per input message,
one output message: a record batch with the input's position (``input``), each record's index in
its message (``record``), the version that computed it (``model_version``), an optional id field
copied from the input, and the model's outputs.

Exactly once, without a transaction between the two brokers' writes (docs/inference.md): every
output message carries the scorer's *frontier* (per input partition, the offset past the last
input message handled) in a header, and the scorer writes one output partition alone. On start it
reads the last message of that partition and seeks the input there; an input delivery below the
frontier (a lease from before a crash) is acked and skipped. The broker must declare
``Capability.SEEK`` and ``Capability.REPLAY``; others are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from infeed.brokers.base import Broker, Consumer, Message
from infeed.codecs import MsgpackCodec, RecordBatch, Schema, encode_message
from infeed.errors import EncodeError, LeaseLostError, UnsupportedOperationError
from infeed.inference._frontier import FRONTIER_HEADER, INPUT_HEADER, encode_frontier, read_frontier
from infeed.inference.batcher import BatchConfig, run_model
from infeed.inference.models import DEFAULT_MAX_LOADED, LoadedModels, VersionFollower
from infeed.inference.protocol import Request
from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry
from infeed.inference.worker import DEFAULT_TORCH_THREADS
from infeed.streams import Received, StreamConsumer
from infeed.types import Capability, Position

__all__ = ["DEFAULT_MAX_MESSAGES", "RESERVED_FIELDS", "ScoreConfig", "Scorer", "score_group"]

#: Messages taken per receive, at most.
DEFAULT_MAX_MESSAGES = 100
#: Output fields the scorer writes itself; a model output may not use these names.
RESERVED_FIELDS = ("input", "record", "model_version")

_FAR = 1e300  # scoring has no deadlines: a finite "never"
_CODEC = MsgpackCodec()
_log = logging.getLogger(__name__)


def score_group(out_topic: str) -> str:
    """Return the default consumer group of the scorer writing ``out_topic``."""
    return f"infeed.score.{out_topic}"


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """How a scorer reads, batches and writes.

    Attributes:
        batch: rows per model call and how long a batch waits to fill (deadlines do not apply).
        inputs: the record fields passed to the model (one: ``model(x)``; several: by name).
        id_field: a record field copied to the output beside the position, for joins.
        schema: validates and casts input records; failing records are dead-lettered.
        group: the consumer group on the input topic (default ``infeed.score.<out topic>``).
        partitions: input partitions to score (default all); scorers splitting one input topic
            need distinct ``out_partition`` values.
        out_partition: the output partition this scorer alone writes.
        version: compute with this version only (no hot reload); None: the latest, and follow.
        events_topic: model-events topic to follow when not pinned; None: no hot reload.
        max_loaded: model versions kept in memory.
        max_messages: messages taken per receive.
        torch_threads: ``torch.set_num_threads`` at start; None leaves it.
    """

    batch: BatchConfig = field(default_factory=BatchConfig)
    inputs: tuple[str, ...] = ("x",)
    id_field: str | None = None
    schema: Schema | None = None
    group: str | None = None
    partitions: tuple[int, ...] | None = None
    out_partition: int = 0
    version: int | None = None
    events_topic: str | None = DEFAULT_EVENTS_TOPIC
    max_loaded: int = DEFAULT_MAX_LOADED
    max_messages: int = DEFAULT_MAX_MESSAGES
    torch_threads: int | None = DEFAULT_TORCH_THREADS

    def __post_init__(self) -> None:
        if not self.inputs or not all(isinstance(n, str) and n for n in self.inputs):
            raise ValueError(f"inputs must be non-empty field names, got {self.inputs!r}")
        if self.id_field in RESERVED_FIELDS:
            raise ValueError(f"id_field {self.id_field!r} is one of the fields the scorer writes")
        if type(self.out_partition) is not int or self.out_partition < 0:
            raise ValueError(f"out_partition must be an int >= 0, got {self.out_partition!r}")
        if type(self.max_messages) is not int or self.max_messages < 1:
            raise ValueError(f"max_messages must be an int >= 1, got {self.max_messages!r}")
        if self.version is not None and (type(self.version) is not int or self.version < 0):
            raise ValueError(f"version must be an int >= 0 or None, got {self.version!r}")


@dataclass
class _Item:
    """One input message in a batch: what it carried, its request, and what became of it."""

    received: Received
    request: Request | None = None
    outputs: dict[str, np.ndarray] | None = None
    failure: str = ""


class Scorer:
    """Scores ``in_topic`` into ``out_topic`` with ``model``; see the module docstring.

    Args:
        broker: where both topics are (not owned).
        registry: where model versions are loaded from.
        model: the model's name.
        in_topic: the topic of records to score.
        out_topic: where scores go (created with ``out_partition + 1`` partitions if missing).
        config: scoring settings.

    Raises:
        UnsupportedOperationError: the broker lacks ``SEEK`` or ``REPLAY``.
        ValueError: the topics are the same, or ``out_partition`` is not in ``out_topic``.
        ConfigError: the output partition's last message was not written by a scorer of
            ``in_topic``.
        LookupError: the registry has no version of ``model`` (or not the pinned one).
    """

    def __init__(
        self,
        broker: Broker,
        registry: ModelRegistry,
        model: str,
        *,
        in_topic: str,
        out_topic: str,
        config: ScoreConfig | None = None,
    ) -> None:
        self.config = cfg = config or ScoreConfig()
        missing = [c.name for c in (Capability.SEEK, Capability.REPLAY) if not broker.supports(c)]
        if missing:
            raise UnsupportedOperationError(
                f"exactly-once scoring needs a log broker with {' and '.join(missing)}: "
                f"{type(broker).__name__} lacks it (the scorer reads its output topic back and seeks "
                "the input); use sqlite, redis, kafka, nats, pulsar or a RabbitMQ stream"
            )
        if in_topic == out_topic:
            raise ValueError(f"the input and output topics must differ, both are {in_topic!r}")
        self.broker, self.model, self.in_topic, self.out_topic = broker, model, in_topic, out_topic
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.models = LoadedModels(registry, model, max_loaded=cfg.max_loaded)
        if cfg.version is not None:
            self.models.get(cfg.version)
        self._open_output()
        self.group = cfg.group or score_group(out_topic)
        parts = self._input_partitions()
        consumer = broker.subscribe(in_topic, group=self.group, partitions=list(parts))
        try:
            self._next = self._recover(consumer, parts)
            consumer.seek([Position(in_topic, p, o) for p, o in sorted(self._next.items())])
        except BaseException:
            consumer.close()
            raise
        self._stream = StreamConsumer(consumer, schema=cfg.schema)
        self._follower: VersionFollower | None = None
        if cfg.version is None and cfg.events_topic is not None:
            self._follower = VersionFollower(broker, self.models, topic=cfg.events_topic)
            self._follower.start()
        #: Records scored, input messages dead-lettered, stale redeliveries skipped, so far.
        self.scored = self.dead_lettered = self.skipped = 0

    def _open_output(self) -> None:
        if self.out_topic not in self.broker.list_topics():
            self.broker.create_topic(self.out_topic, partitions=self.config.out_partition + 1)
        have = len(self.broker.describe_topic(self.out_topic).partitions)
        if self.config.out_partition >= have:
            raise ValueError(
                f"out_partition {self.config.out_partition} is not in {self.out_topic} ({have} partitions)"
            )

    def _input_partitions(self) -> tuple[int, ...]:
        if self.in_topic not in self.broker.list_topics():
            self.broker.create_topic(self.in_topic, partitions=self.broker.config.default_partitions)
        have = len(self.broker.describe_topic(self.in_topic).partitions)
        parts = self.config.partitions or tuple(range(have))
        for p in parts:
            if not 0 <= p < have:
                raise ValueError(f"input partition {p} is not in {self.in_topic} ({have} partitions)")
        return parts

    def _recover(self, consumer: Consumer, parts: tuple[int, ...]) -> dict[int, int]:
        """Return where each input partition resumes: the output's frontier, else the commits."""
        frontier = read_frontier(
            self.broker, self.out_topic, self.config.out_partition, self.in_topic, group=f"{self.group}.tail"
        )
        if frontier is None:  # nothing scored: where the group stands, else the start of the log
            committed = consumer.committed() if self.broker.supports(Capability.OFFSET_COMMIT) else {}
            frontier = {p: pos.offset for p, pos in committed.items()}
        info = self.broker.describe_topic(self.in_topic)
        return {p: frontier.get(p, info.partitions[p].low) for p in parts}

    @property
    def frontier(self) -> dict[int, int]:
        """Input partition -> offset of the first message not yet handled."""
        return dict(self._next)

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Score until ``stop`` is set (forever without one)."""
        while stop is None or not stop.is_set():
            self.run_once(timeout_s=poll_s)

    def run_once(self, timeout_s: float = 0.5) -> int:
        """Gather one batch, score it, publish, then ack; return the records scored."""
        self.models.install_ready()
        items = self._gather(timeout_s)
        if not items:
            return 0
        version, module = self.models.get(self.config.version)
        ready = [it for it in items if it.request is not None]
        for chunk in self._chunks(ready):
            self._compute(module, chunk)
        messages = self._outputs(items, version)
        if messages:
            self.broker.publish_many(self.out_topic, messages)  # before acks: the output is the truth
        self._settle(items)
        done = sum(len(it.received.batch) for it in items if it.outputs is not None)
        self.scored += done
        return done

    def _gather(self, timeout_s: float) -> list[_Item]:
        items: list[_Item] = []
        rows = 0
        close_at: float | None = None
        wait_s = timeout_s
        size = self.config.batch.max_batch_size
        while rows < size:
            room = min(self.config.max_messages, size - rows)  # a message holds one row or more
            for r in self._stream.receive(max_messages=room, timeout_s=wait_s):
                item = self._admit(r)
                if item is not None:
                    items.append(item)
                    rows += len(r.batch)
            if close_at is None:
                if not items:
                    return items
                close_at = time.monotonic() + self.config.batch.max_wait_s
            wait_s = min(0.02, close_at - time.monotonic())
            if wait_s <= 0:
                break
        return items

    def _admit(self, r: Received) -> _Item | None:
        p, offset = r.delivery.partition, r.delivery.position.offset
        if offset < self._next.get(p, 0):  # handled before a crash or a lease ran out: skip
            self._ack([r])
            self.skipped += 1
            return None
        item = _Item(r)
        try:
            inputs = {name: r.batch.columns[name] for name in self.config.inputs}
            item.request = Request(
                request_id=str(r.delivery.position)[:128],
                reply_to=self.out_topic,
                deadline=_FAR,
                model=self.model,
                inputs=inputs,
            )
        except KeyError as exc:
            item.failure = f"record has no input field {exc}; it has {list(r.batch.field_names)}"
        except (TypeError, ValueError) as exc:
            item.failure = f"inputs do not make a model input: {exc}"
        return item

    def _chunks(self, ready: Sequence[_Item]) -> list[list[_Item]]:
        chunks: list[list[_Item]] = []
        size = self.config.batch.max_batch_size
        rows = 0
        for it in ready:
            n = len(it.received.batch)
            if not chunks or rows + n > size:
                chunks.append([])
                rows = 0
            chunks[-1].append(it)
            rows += n
        return chunks

    def _compute(self, module: torch.nn.Module, chunk: list[_Item]) -> None:
        try:
            with torch.inference_mode():
                results = run_model(module, [it.request for it in chunk if it.request is not None])
        except Exception as exc:
            if len(chunk) == 1:
                chunk[0].failure = f"model {self.model} failed: {type(exc).__name__}: {exc}"
                return
            half = len(chunk) // 2  # bisect: only the failing message is dead-lettered
            self._compute(module, chunk[:half])
            self._compute(module, chunk[half:])
            return
        for it, outputs in zip(chunk, results, strict=True):
            it.outputs = outputs

    def _outputs(self, items: list[_Item], version: int) -> list[Message]:
        messages: list[Message] = []
        for it in items:  # in arrival order, so each frontier covers exactly what precedes it
            d = it.received.delivery
            self._next[d.partition] = d.position.offset + 1
            encoded = None
            if it.outputs is not None:
                try:
                    encoded = self._encode(it.received, it.outputs, version)
                except (EncodeError, ValueError) as exc:
                    it.outputs, it.failure = None, f"outputs cannot travel: {exc}"
            if encoded is None:
                self._dead_letter(it)
                continue
            payload, headers = encoded
            headers[FRONTIER_HEADER] = encode_frontier(self.in_topic, self._next)
            headers[INPUT_HEADER] = str(d.position)
            messages.append(Message(payload, d.key, headers, self.config.out_partition))
        return messages

    def _encode(
        self, r: Received, outputs: dict[str, np.ndarray], version: int
    ) -> tuple[bytes, dict[str, str]]:
        n = len(r.batch)
        clash = sorted(set(outputs) & {*RESERVED_FIELDS, self.config.id_field})
        if clash:
            raise ValueError(f"model outputs {clash} clash with the fields the scorer writes")
        columns: dict[str, np.ndarray] = {
            "input": np.array([str(r.delivery.position)] * n, dtype=object),
            "record": np.array([r.index_in_message(i) for i in range(n)], dtype=np.int64),
            "model_version": np.full(n, version, dtype=np.int64),
        }
        if self.config.id_field is not None and self.config.id_field in r.batch.columns:
            columns[self.config.id_field] = r.batch.columns[self.config.id_field]
        columns.update(outputs)
        payload, headers = encode_message(_CODEC, RecordBatch(columns, length=n))
        if len(payload) > self.broker.max_payload_bytes:
            raise ValueError(f"{len(payload)} bytes is over the broker's {self.broker.max_payload_bytes}")
        return payload, headers

    def _dead_letter(self, it: _Item) -> None:
        d = it.received.delivery
        try:
            self._stream.consumer.nack(d, requeue=False, reason=it.failure or "not scored")
        except LeaseLostError:  # handled before; the frontier skips it from now on
            _log.warning("lease lost on a dead-lettered input at %s", d.position)
        self.dead_lettered += 1

    def _settle(self, items: list[_Item]) -> None:
        self._ack([it.received for it in items if it.outputs is not None])
        if self.broker.supports(Capability.OFFSET_COMMIT):  # lag for people; never the truth
            self._stream.commit([Position(self.in_topic, p, o) for p, o in self._next.items()])

    def _ack(self, received: list[Received]) -> None:
        if not received:
            return
        try:
            self._stream.ack(received)
        except LeaseLostError as exc:  # handled already; the frontier skips any redelivery
            _log.warning("lease lost on %d scored message(s)", len(exc.positions))

    def close(self) -> None:
        """Stop following model events and leave the input group. Idempotent."""
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        self._stream.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
