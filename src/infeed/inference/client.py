"""``Client``: request-reply over the queue; ``submit`` returns a future, ``predict`` waits.

The client owns a reply topic (``infeed.replies.<uuid>`` unless one is named) and subscribes to it
before it sends anything. A daemon thread receives replies, resolves the future of each by
``request_id`` and acks it; a reply for a request already resolved (a duplicate after a worker
crash) or unknown is dropped and counted. Requests past their ``timeout_s`` fail locally with
``DeadlineExceededError``. At most ``max_in_flight`` requests wait at once; ``submit`` blocks for
a slot. With ``max_queue_depth`` set, a request whose topic's backlog is deeper is refused at once
with ``QueueFull``. ``AsyncClient`` (``infeed.inference.aio``) adapts this one implementation.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np

from infeed.brokers.base import Broker
from infeed.errors import DeadlineExceededError, DecodeError, InferenceError, QueueFull, TopicNotFoundError
from infeed.inference.backpressure import DEFAULT_DEPTH_CACHE_S, DepthGate
from infeed.inference.protocol import (
    ErrorCode,
    Reply,
    Request,
    decode_reply,
    encode_request,
    reply_topic,
    request_topic,
    worker_group,
)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "DEFAULT_TIMEOUT_S", "Client", "ClientConfig", "Inputs"]

#: Seconds a request may take, end to end, unless ``timeout_s`` says otherwise.
DEFAULT_TIMEOUT_S = 10.0
#: Requests a client has waiting at once, at most.
DEFAULT_MAX_IN_FLIGHT = 1024
#: Longest blocking receive of the reply thread (also how often local timeouts are checked).
_RECEIVE_S = 0.05

#: Inputs: name -> array, or one array (named ``"x"``).
Inputs = Mapping[str, np.ndarray] | np.ndarray

_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a client sends.

    Attributes:
        timeout_s: default end-to-end timeout; becomes the request's deadline.
        max_in_flight: requests waiting at once, at most.
        max_queue_depth: refuse with ``QueueFull`` above this backlog per request topic; None: never.
        depth_cache_s: how long a backlog reading is reused.
        reply_topic: where replies come (default a new ``infeed.replies.<uuid>``, deleted on close).
        group: the workers' consumer group (for the backlog; default ``infeed.workers.<model>``).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queue_depth: int | None = None
    depth_cache_s: float = DEFAULT_DEPTH_CACHE_S
    reply_topic: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if type(self.max_in_flight) is not int or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {self.max_in_flight!r}")


@dataclass
class _Waiting:
    future: Future[Reply]
    expires: float  # monotonic


class Client:
    """Sends inference requests for ``model`` and waits for replies. Thread-safe.

    Args:
        broker: where requests go and replies come (not owned).
        model: the model's name.
        config: client settings.
    """

    def __init__(self, broker: Broker, model: str, *, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self.broker = broker
        self.model = model
        self._group = self.config.group or worker_group(model)
        self._own_topic = self.config.reply_topic is None
        self.reply_topic = self.config.reply_topic or reply_topic(uuid.uuid4().hex)
        self._consumer = broker.subscribe(self.reply_topic, group=self.reply_topic, start="latest")
        self._gate = (
            None
            if self.config.max_queue_depth is None
            else DepthGate(
                broker, self._group, max_depth=self.config.max_queue_depth, cache_s=self.config.depth_cache_s
            )
        )
        self._slots = threading.BoundedSemaphore(self.config.max_in_flight)
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self._stop = threading.Event()
        #: Replies dropped: duplicates of answered requests, or for requests this client no longer waits on.
        self.duplicates = 0
        self._thread = threading.Thread(target=self._receive_loop, name="infeed-client-replies", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet resolved."""
        with self._lock:
            return len(self._waiting)

    def submit(
        self,
        inputs: Inputs,
        *,
        timeout_s: float | None = None,
        priority: int = 0,
        model_version: int | None = None,
    ) -> Future[Reply]:
        """Send one request; the future resolves to its successful ``Reply``.

        Args:
            inputs: name -> array (every array with the same leading rows dimension), or one array.
            timeout_s: end-to-end timeout (default ``config.timeout_s``); the request's deadline.
            priority: 0 is the highest.
            model_version: compute with this version (default the workers' current one).

        Returns:
            A future of the ``Reply``; it raises ``InferenceError`` for an error reply and
            ``DeadlineExceededError`` when no reply came in time.

        Raises:
            QueueFull: the request topic's backlog is over ``max_queue_depth``, or no in-flight
                slot freed within ``timeout_s``.
            ValueError: invalid inputs, priority or version (nothing sent).
        """
        if self._stop.is_set():
            raise RuntimeError("the client is closed")
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout!r}")
        request = Request(
            request_id=uuid.uuid4().hex,
            reply_to=self.reply_topic,
            deadline=time.time() + timeout,  # wall clock: the deadline crosses processes
            priority=priority,
            model=self.model,
            model_version=model_version,
            inputs={"x": inputs} if isinstance(inputs, np.ndarray) else inputs,
        )
        topic = request_topic(self.model, priority)
        if self._gate is not None:
            self._gate.check(topic)
        payload = encode_request(request)
        if not self._slots.acquire(timeout=timeout):
            raise QueueFull(
                f"{self.config.max_in_flight} requests stayed in flight for {timeout:g} s (max_in_flight)"
            )
        future: Future[Reply] = Future()
        with self._lock:
            self._waiting[request.request_id] = _Waiting(future, time.monotonic() + timeout)
        try:
            self.broker.publish(topic, payload)
        except BaseException:
            self._forget(request.request_id)
            raise
        return future

    def predict(
        self,
        inputs: Inputs,
        *,
        timeout_s: float | None = None,
        priority: int = 0,
        model_version: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Send one request and wait for its outputs.

        Raises:
            InferenceError: the request was answered with an error (``code`` says which).
            DeadlineExceededError: no reply within ``timeout_s``.
            QueueFull: refused at once; retry after ``retry_after_s``.
        """
        future = self.submit(inputs, timeout_s=timeout_s, priority=priority, model_version=model_version)
        return dict(future.result().outputs)

    def _forget(self, request_id: str) -> _Waiting | None:
        with self._lock:
            waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            self._slots.release()
        return waiting

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                deliveries = self._consumer.receive(max_messages=256, timeout_s=_RECEIVE_S)
                for delivery in deliveries:
                    self._resolve(delivery.payload)
                if deliveries:
                    self._consumer.ack(deliveries)
            except Exception as exc:  # broker trouble: retried; callers' timeouts still run
                if self._stop.is_set():
                    return
                _log.warning("reply receive failed, retrying: %s", exc)
                self._stop.wait(0.5)
            self._expire()

    def _resolve(self, payload: bytes) -> None:
        try:
            reply = decode_reply(payload)
        except DecodeError as exc:
            _log.warning("dropping a reply that does not decode: %s", exc)
            return
        waiting = self._forget(reply.request_id)
        if waiting is None:
            self.duplicates += 1
            return
        if reply.error is None:
            waiting.future.set_result(reply)
            return
        cls = DeadlineExceededError if reply.error.code is ErrorCode.DEADLINE_EXCEEDED else InferenceError
        message = (
            f"{reply.error.code}: {reply.error.message} (request {reply.request_id}, model {reply.model}"
        )
        message += f" version {reply.model_version})" if reply.model_version is not None else ")"
        waiting.future.set_exception(
            cls(
                message,
                code=str(reply.error.code),
                request_id=reply.request_id,
                model_version=reply.model_version,
            )
        )

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [rid for rid, w in self._waiting.items() if w.expires <= now]
        for rid in late:
            waiting = self._forget(rid)
            if waiting is not None:
                waiting.future.set_exception(
                    DeadlineExceededError(
                        f"no reply to request {rid} for model {self.model} within its timeout",
                        code=str(ErrorCode.DEADLINE_EXCEEDED),
                        request_id=rid,
                    )
                )

    def close(self) -> None:
        """Stop receiving; requests still waiting are cancelled. Deletes an own reply topic. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for w in waiting:
            w.future.cancel()
        self._consumer.close()
        if self._own_topic:
            try:
                self.broker.delete_topic(self.reply_topic)
            except TopicNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
