"""The stream model's group lock: which process reads a group, and how it hands the group over.

RabbitMQ does not share one stream among competing AMQP 0-9-1 consumers, so a group has one active
process at a time: the one that holds the exclusive queue ``TOPIC:lock:GROUP`` (RabbitMQ deletes
it when that connection dies). Other processes wait, consuming from ``TOPIC:wait:GROUP`` so the
holder can see them; a timer on the holder's I/O thread checks that queue every ``hold_s`` and,
when someone waits, stops handing out and hands the group over once its deliveries are settled.

``GroupLock`` keeps the hold; the stream group (``_rabbitmq_stream.StreamGroup``) fills in what
taking, dropping and handing over the group means for its reader and leases.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika.exceptions

from infeed.brokers._rabbitmq_io import Chan, Loop
from infeed.brokers._rabbitmq_state import lock_queue, wait_queue

if TYPE_CHECKING:
    from infeed.brokers.rabbitmq import RabbitMQBroker

_RESOURCE_LOCKED = 405


def declare_wait_queue(broker: RabbitMQBroker, topic: str, group: str) -> None:
    """Declare the queue that processes waiting for ``group`` consume from."""
    wq = wait_queue(topic, group)
    broker._admin(
        "declaring the wait queue",
        lambda chan: chan.rpc(
            lambda cb: chan.impl.queue_declare(wq, durable=True, callback=cb), "wait queue"
        ),
    )


class GroupLock(abc.ABC):
    """One group's hold in this process: taking the lock queue, waiting for it, handing it over."""

    def __init__(self, broker: RabbitMQBroker, topic: str, group: str) -> None:
        self.b, self.topic, self.group = broker, topic, group
        self.cond = threading.Condition()
        self.gen = 0  # bumped whenever the hold begins or ends: leases of an older one are lost
        self.held = False
        self.yielding = False
        self.releasing = False
        self.loop: Loop | None = None
        self.lock_chan: Chan | None = None
        self.waiter: Chan | None = None
        self.acquired_at = 0.0
        self.next_try = 0.0
        self.checking = False
        cfg = broker.config
        self.lease_s = cfg.ack_timeout_s
        self.hold_s = cfg.hold_s
        self.poll_s = min(0.1, max(0.01, cfg.hold_s / 10))
        self.tick_s = max(0.02, min(self.lease_s / 4, 1.0, self.poll_s * 5))

    @abc.abstractmethod
    def _try_acquire(self) -> bool:
        """Take the lock (``_take_lock``) and start reading; False if another process holds it."""

    @abc.abstractmethod
    def _check_reader(self) -> None:
        """Raise what stopped the reader of a held group for good (under ``cond``)."""

    @abc.abstractmethod
    def _drop(self) -> None:
        """The hold is gone: forget it and what was read under it (under ``cond``)."""

    @abc.abstractmethod
    def expire(self, now: float) -> None:
        """Give expired leases back to the group (under ``cond``)."""

    @abc.abstractmethod
    def inflight_count(self) -> int:
        """How many deliveries are handed out and not settled yet (under ``cond``)."""

    @abc.abstractmethod
    def _hand_over(self, gen: int) -> None:
        """Release the group to a waiting process (I/O thread, asynchronously)."""

    def ensure_held(self, deadline: float) -> bool:
        """Return True once this process holds the group; False at ``deadline``."""
        while True:
            with self.cond:
                if self.held and self.loop is not None and self.loop.closed:
                    self._drop()
                if self.held and not self.yielding:
                    self._check_reader()
                    return True
                busy = self.held or self.releasing
            now = time.monotonic()
            if not busy and now >= self.next_try:
                if self._try_acquire():
                    return True
                self.next_try = time.monotonic() + self.poll_s
                self._ensure_waiter()
            now = time.monotonic()
            if now >= deadline:
                return False
            with self.cond:
                self.cond.wait(max(0.001, min(deadline, self.next_try if not busy else deadline) - now))

    def _take_lock(self) -> tuple[Loop, Chan] | None:
        """Declare the exclusive lock queue on a new channel; None if another process holds it."""
        loop = self.b._live()
        chan = loop.channel()
        lq = lock_queue(self.topic, self.group)
        try:
            chan.rpc(
                lambda cb: chan.impl.queue_declare(lq, exclusive=True, auto_delete=True, callback=cb),
                "locking",
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == _RESOURCE_LOCKED:
                return None
            raise
        return loop, chan

    def _stop_waiting(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.close()

    def _ensure_waiter(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.closed:
            return
        chan = self.b._live().channel()
        wq = wait_queue(self.topic, self.group)
        chan.rpc(lambda cb: chan.impl.queue_declare(wq, durable=True, callback=cb), "wait queue")
        chan.rpc(lambda cb: chan.impl.basic_consume(wq, lambda *_: None, callback=cb), "waiting")
        self.waiter = chan

    def _unlock(self, lock_chan: Chan) -> None:
        """Delete the lock queue (and wait for it) if ``lock_chan`` is still open."""
        if not lock_chan.closed:
            lq = lock_queue(self.topic, self.group)
            lock_chan.rpc(lambda cb: lock_chan.impl.queue_delete(lq, callback=cb), "unlocking")

    def _unlock_soon(self, lock_chan: Chan | None, finished: Callable[..., None]) -> None:
        """Delete the lock queue, then call ``finished`` (I/O thread; at once if already closed)."""
        if lock_chan is None or not lock_chan.impl.is_open:
            finished()
            return
        lq = lock_queue(self.topic, self.group)
        lock_chan.impl.queue_delete(lq, callback=finished)

    # -- the timer: lease expiry and hand-over (I/O thread) ---------------------------------

    def _tick(self, gen: int) -> None:
        with self.cond:
            if gen != self.gen or not self.held or self.loop is None:
                return
            now = time.monotonic()
            self.expire(now)
            query = not self.yielding and not self.checking and now - self.acquired_at >= self.hold_s
            handover = self.yielding and not self.inflight_count() and not self.releasing
            lock_chan, loop = self.lock_chan, self.loop
        if query and lock_chan is not None and lock_chan.impl.is_open:
            self.checking = True
            wq = wait_queue(self.topic, self.group)
            lock_chan.impl.queue_declare(
                wq, durable=True, callback=lambda frame: self._on_waiters(gen, frame)
            )
        if handover:
            self._hand_over(gen)
        loop.call_later(self.tick_s, lambda: self._tick(gen))

    def _on_waiters(self, gen: int, frame: Any) -> None:
        with self.cond:
            self.checking = False
            if gen != self.gen:
                return
            if frame.method.consumer_count > 0:
                self.yielding = True  # hand out nothing new; hand over once settled
            else:
                self.acquired_at = time.monotonic()
