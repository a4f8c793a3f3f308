"""``Worker``: serves one model from its request topics, in batches, replying before acking.

Each loop: gather a batch (``Batcher``), install versions the follower has loaded, answer expired
requests ``DEADLINE_EXCEEDED`` (never computed), run the model once per version in the batch under
``torch.inference_mode``, publish every reply to its ``reply_to`` topic and only then ack the
requests. A batch whose model call fails is split in halves and retried, down to the one request
that fails: it alone gets a ``MODEL_ERROR`` reply and a dead-letter copy with the reason.

A worker killed at any moment loses nothing: its unacked requests are delivered again once their
lease (the broker's ``ack_timeout_s``) runs out, to any worker of the group. A request answered
but not yet acked when the worker died is answered twice; clients keep the first reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from infeed.brokers.base import Broker, Consumer, Message
from infeed.errors import BrokerError, EncodeError, LeaseLostError
from infeed.inference.batcher import Batch, BatchConfig, Batcher, Pending, run_model
from infeed.inference.middleware import Middleware
from infeed.inference.models import DEFAULT_MAX_LOADED, LoadedModels, VersionFollower
from infeed.inference.protocol import (
    ErrorCode,
    Reply,
    ReplyError,
    encode_reply,
    request_topics,
    worker_group,
)
from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry
from infeed.types import Capability, Delivery, Position

__all__ = [
    "DEFAULT_COMMIT_INTERVAL_S",
    "DEFAULT_PRIORITY_LEVELS",
    "DEFAULT_TORCH_THREADS",
    "Worker",
    "WorkerConfig",
]

#: Priority levels served (topics ``.p0`` to ``.p<N-1>``).
DEFAULT_PRIORITY_LEVELS = 3
#: torch intra-op threads per worker: one, so N worker processes use N cores.
DEFAULT_TORCH_THREADS = 1
#: Least time between two commits of the answered position (a commit is a broker round trip).
DEFAULT_COMMIT_INTERVAL_S = 0.25

_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """How a worker serves.

    Attributes:
        batch: batching settings.
        priorities: priority levels served.
        group: the consumer group on the request topics (default ``infeed.workers.<model>``).
        events_topic: the model-events topic to follow; None: serve the versions loaded at start
            (and pinned ones) only.
        max_loaded: model versions kept in memory.
        torch_threads: ``torch.set_num_threads`` at start; None leaves it.
        commit_interval_s: least time between commits of the answered position, which only feeds
            the backlog count behind ``QueueFull`` (acks, not commits, settle requests).
    """

    batch: BatchConfig = field(default_factory=BatchConfig)
    priorities: int = DEFAULT_PRIORITY_LEVELS
    group: str | None = None
    events_topic: str | None = DEFAULT_EVENTS_TOPIC
    max_loaded: int = DEFAULT_MAX_LOADED
    torch_threads: int | None = DEFAULT_TORCH_THREADS
    commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S

    def __post_init__(self) -> None:
        if not isinstance(self.commit_interval_s, int | float) or not 0 <= self.commit_interval_s < float(
            "inf"
        ):
            raise ValueError(
                f"commit_interval_s must be a finite number >= 0, got {self.commit_interval_s!r}"
            )
        if self.torch_threads is not None and (type(self.torch_threads) is not int or self.torch_threads < 1):
            raise ValueError(f"torch_threads must be an int >= 1 or None, got {self.torch_threads!r}")


@dataclass
class _Outcome:
    """What one batch produced: replies by topic, deliveries to ack, deliveries to dead-letter."""

    replies: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    ack: list[Delivery] = field(default_factory=list)
    dead: list[tuple[Delivery, str]] = field(default_factory=list)


class Worker:
    """Serves ``model`` from the registry to the requests on its topics.

    Args:
        broker: where requests come from and replies go (not owned).
        registry: where versions are loaded from.
        model: the model's name.
        config: serving settings.
        middleware: hooks called around batches (metrics, ...), in order.

    Raises:
        LookupError: the registry has no version of ``model``.
    """

    def __init__(
        self,
        broker: Broker,
        registry: ModelRegistry,
        model: str,
        *,
        config: WorkerConfig | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.config = config or WorkerConfig()
        self.broker = broker
        self.model = model
        self.middleware = list(middleware)
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        self.models = LoadedModels(registry, model, max_loaded=self.config.max_loaded)
        self._follower: VersionFollower | None = None
        if self.config.events_topic is not None:
            self._follower = VersionFollower(broker, self.models, topic=self.config.events_topic)
        group = self.config.group or worker_group(model)
        topics = request_topics(model, self.config.priorities)
        self._consumers: dict[str, Consumer] = {t: broker.subscribe(t, group=group) for t in topics}
        self.batcher = Batcher(list(self._consumers.values()), self.config.batch)
        self._commit = broker.supports(Capability.OFFSET_COMMIT)
        self._committed: dict[tuple[str, int], int] = {}
        self._to_commit: dict[tuple[str, int], int] = {}
        self._committed_at = time.monotonic()
        #: Requests answered so far (any outcome).
        self.answered = 0
        for mw in self.middleware:
            mw.after_swap(self.models.current)
        if self._follower is not None:
            self._follower.start()
            self._catch_up(registry)

    def _catch_up(self, registry: ModelRegistry) -> None:
        # A version published between loading the latest and subscribing to events has no event
        # this follower will see: look once more, now that the follower listens.
        latest = registry.latest(self.model)
        if latest is not None and latest.version > self.models.current:
            self.models.offer(latest.version, registry.load(self.model, latest.version))

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Serve until ``stop`` is set (forever without one)."""
        while stop is None or not stop.is_set():
            self.run_once(timeout_s=poll_s)

    def run_once(self, timeout_s: float = 0.5) -> int:
        """Gather and answer one batch; return the number of requests answered (0 if none came)."""
        for version in self.models.install_ready():
            if version == self.models.current:
                for mw in self.middleware:
                    mw.after_swap(version)
        batch = self.batcher.next_batch(timeout_s)
        if not batch:
            self._flush_commits()
            return 0
        out = _Outcome()
        self._answer_unservable(batch, out)
        by_version: dict[int | None, list[Pending]] = defaultdict(list)
        for p in batch.ready:
            if p.request.model != self.model:
                self._error(
                    out,
                    p,
                    ErrorCode.INVALID_INPUT,
                    f"this worker serves {self.model!r}, not {p.request.model!r}",
                )
            else:
                by_version[p.request.model_version].append(p)
        for pin, group in by_version.items():
            try:
                version, module = self.models.get(pin)
            except LookupError as exc:
                for p in group:
                    self._error(out, p, ErrorCode.MODEL_NOT_FOUND, str(exc))
                continue
            except Exception as exc:  # the pinned version exists but does not load
                for p in group:
                    self._error(out, p, ErrorCode.MODEL_ERROR, f"version {pin} does not load: {exc!r}")
                continue
            self._compute(version, module, group, out)
        self._settle(out)
        answered = len(out.ack) + len(out.dead)
        self.answered += answered
        return answered

    def _answer_unservable(self, batch: Batch, out: _Outcome) -> None:
        for delivery, exc in batch.invalid:
            if exc.request_id and exc.reply_to:
                error = ReplyError(code=ErrorCode.INVALID_INPUT, message=str(exc))
                reply = Reply(request_id=exc.request_id, model=self.model, error=error)
                out.replies[exc.reply_to].append(Message(encode_reply(reply)))
            out.dead.append((delivery, str(exc)))
            for mw in self.middleware:
                mw.after_error(None, ErrorCode.INVALID_INPUT, dead_lettered=True)
        for p in batch.expired:
            self._expired(out, p)

    def _expired(self, out: _Outcome, p: Pending) -> None:
        late = time.time() - p.request.deadline
        self._error(
            out, p, ErrorCode.DEADLINE_EXCEEDED, f"deadline passed {late:.3f} s before compute; not computed"
        )

    def _compute(self, version: int, module: torch.nn.Module, group: list[Pending], out: _Outcome) -> None:
        ready, expired = self.batcher.split_expired(group)  # checked again just before the model runs
        for p in expired:
            self._expired(out, p)
        if not ready:
            return
        for mw in self.middleware:
            mw.before_batch(ready, version)
        start = time.monotonic()
        try:
            with torch.inference_mode():
                results = run_model(module, [p.request for p in ready])
        except Exception as exc:
            if len(ready) == 1:
                reason = f"model {self.model} version {version} failed: {type(exc).__name__}: {exc}"
                self._error(out, ready[0], ErrorCode.MODEL_ERROR, reason, version=version, dead_letter=True)
                return
            half = len(ready) // 2  # bisect: only the failing request is answered with the error
            self._compute(version, module, ready[:half], out)
            self._compute(version, module, ready[half:], out)
            return
        compute_s = time.monotonic() - start
        for mw in self.middleware:
            mw.after_batch(ready, version, compute_s)
        for p, outputs in zip(ready, results, strict=True):
            reply = Reply(
                request_id=p.request.request_id, model=self.model, model_version=version, outputs=outputs
            )
            try:
                payload = encode_reply(reply)
            except EncodeError as exc:
                self._error(out, p, ErrorCode.MODEL_ERROR, f"outputs cannot travel: {exc}", version=version)
                continue
            if len(payload) > self.broker.max_payload_bytes:
                message = (
                    f"reply of {len(payload)} bytes is over the broker's {self.broker.max_payload_bytes}"
                )
                self._error(out, p, ErrorCode.MODEL_ERROR, message, version=version)
                continue
            out.replies[p.request.reply_to].append(Message(payload))
            out.ack.append(p.delivery)

    def _error(
        self,
        out: _Outcome,
        p: Pending,
        code: ErrorCode,
        message: str,
        *,
        version: int | None = None,
        dead_letter: bool = False,
    ) -> None:
        error = ReplyError(code=code, message=message)
        reply = Reply(request_id=p.request.request_id, model=self.model, model_version=version, error=error)
        out.replies[p.request.reply_to].append(Message(encode_reply(reply)))
        if dead_letter:
            out.dead.append((p.delivery, message))
        else:
            out.ack.append(p.delivery)
        for mw in self.middleware:
            mw.after_error(p, code, dead_lettered=dead_letter)

    def _settle(self, out: _Outcome) -> None:
        # Replies first: once a request is acked, its reply must already be on the broker.
        for topic, messages in out.replies.items():
            self.broker.publish_many(topic, messages)
        by_topic: dict[str, list[Delivery]] = defaultdict(list)
        for d in out.ack:
            by_topic[d.topic].append(d)
        for topic, deliveries in by_topic.items():
            consumer = self._consumers[topic]
            try:
                consumer.ack(deliveries)
            except LeaseLostError as exc:  # answered already; the new holder answers again
                _log.warning(
                    "lease lost on %d answered request(s); they will be answered again", len(exc.positions)
                )
            self._commit_acked(consumer, deliveries)
        self._flush_commits()
        for delivery, reason in out.dead:
            try:
                self._consumers[delivery.topic].nack(delivery, requeue=False, reason=reason)
            except LeaseLostError:
                _log.warning("lease lost on a dead-lettered request at %s", delivery.position)

    def _commit_acked(self, consumer: Consumer, deliveries: list[Delivery]) -> None:
        # The group's committed position is what clients read the backlog from (lag); it only
        # moves forward from this worker, and never stands for an ack.
        if not self._commit:
            return
        best: dict[int, int] = {}
        for d in deliveries:
            best[d.partition] = max(best.get(d.partition, -1), d.next_position.offset)
        for partition, offset in best.items():
            key = (consumer.topic, partition)
            if offset > max(self._committed.get(key, -1), self._to_commit.get(key, -1)):
                self._to_commit[key] = offset

    def _flush_commits(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self._to_commit or (not force and now - self._committed_at < self.config.commit_interval_s):
            return
        by_topic: dict[str, list[Position]] = defaultdict(list)
        for (topic, partition), offset in self._to_commit.items():
            by_topic[topic].append(Position(topic, partition, offset))
        self._committed.update(self._to_commit)
        self._to_commit.clear()
        self._committed_at = now
        for topic, positions in by_topic.items():
            self._consumers[topic].commit(positions)

    def close(self) -> None:
        """Stop following events and leave the group; held requests are given back. Idempotent."""
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        for p in self.batcher.take_held():
            try:
                self._consumers[p.delivery.topic].nack(p.delivery, requeue=True)
            except LeaseLostError:  # already another worker's: nothing to give back
                pass
        if self._consumers:
            try:
                self._flush_commits(force=True)
            except BrokerError as exc:  # only the backlog count lags; requests are settled by acks
                _log.warning("could not commit the answered position on close: %s", exc)
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
