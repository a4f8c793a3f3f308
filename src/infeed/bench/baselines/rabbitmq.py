"""pika's SelectConnection on RabbitMQ: the baseline of ``amqp://``.

Produce: persistent messages to a durable classic queue, publisher confirms kept in a window of
1,000 unconfirmed messages (SelectConnection is ~3x BlockingConnection here, BROKERS.md).
Consume: ``basic_consume`` with prefetch 1,000 and a multiple-ack every 500 messages.
The I/O loop runs only while an operation runs, in the calling thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pika.spec

from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, RawSide, expect

__all__ = ["RabbitMQRaw"]

_WINDOW = 1000
_PREFETCH = 1000
_ACK_EVERY = 500
_PERSISTENT = pika.BasicProperties(delivery_mode=2)

Finish = Callable[[BaseException | None], None]


class RabbitMQRaw(RawSide):
    """pika SelectConnection: confirms in a window of 1,000; prefetch 1,000, multiple-ack 500."""

    label = (
        "pika SelectConnection: persistent publish, confirms window 1000; "
        "basic_consume prefetch 1000, multiple-ack every 500"
    )

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        self._params = pika.URLParameters(self._require_url())
        self._conn: Any = None
        self._chan: Any = None
        self._finish: Finish | None = None
        self._on_confirm: Callable[[Any], None] | None = None
        self._tag = 0  # last delivery tag published on the channel (confirm mode numbers from 1)
        self._open()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self, start: Callable[[Finish], None], timeout_s: float, what: str) -> None:
        """Run the I/O loop from ``start(finish)`` until ``finish`` is called; raise what it got."""
        result: list[BaseException | None] = []

        def finish(error: BaseException | None = None) -> None:
            if not result:
                result.append(error)
                self._conn.ioloop.stop()

        self._finish = finish
        timer = None
        try:
            start(finish)
            timer = self._conn.ioloop.call_later(
                timeout_s, lambda: finish(BenchError(f"RabbitMQ: {what} took over {timeout_s:.0f} s"))
            )
            if not result:
                self._conn.ioloop.start()
        finally:
            self._finish = None
            if timer is not None:
                self._conn.ioloop.remove_timeout(timer)
        if result and result[0] is not None:
            raise result[0]

    def _closed(self, what: str, reason: Any) -> None:
        if self._finish is not None:
            self._finish(BenchError(f"RabbitMQ {what} closed: {reason}"))

    def _open(self) -> None:
        def start(finish: Finish) -> None:
            self._conn = pika.SelectConnection(
                self._params,
                on_open_callback=lambda _conn: self._open_channel(finish),
                on_open_error_callback=lambda _c, exc: finish(
                    BenchError(f"cannot connect to RabbitMQ: {exc}")
                ),
                on_close_callback=lambda _c, reason: self._closed("connection", reason),
            )

        self._run(start, 30.0, "connecting")

    def _ensure_open(self) -> None:
        if self._conn is None or not self._conn.is_open:
            self._open()
        elif self._chan is None or not self._chan.is_open:
            self._run(self._open_channel, 30.0, "opening a channel")

    def _open_channel(self, finish: Finish) -> None:
        def on_channel(chan: Any) -> None:
            self._chan, self._tag = chan, 0
            chan.add_on_close_callback(lambda _c, reason: self._closed("channel", reason))
            chan.confirm_delivery(
                self._confirmed,
                callback=lambda _f: chan.basic_qos(
                    prefetch_count=_PREFETCH, callback=lambda _f: finish(None)
                ),
            )

        self._conn.channel(on_open_callback=on_channel)

    def _confirmed(self, frame: Any) -> None:
        if self._on_confirm is not None:
            self._on_confirm(frame.method)

    # -- the side -----------------------------------------------------------------------------

    def prepare(self, topic: str) -> None:
        """Declare a fresh durable classic queue named ``topic``."""
        self._ensure_open()
        self._run(
            lambda finish: self._chan.queue_declare(topic, durable=True, callback=lambda _f: finish(None)),
            30.0,
            "queue_declare",
        )

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """Publish everything with at most ``_WINDOW`` unconfirmed; return when all are confirmed."""
        count = sum(len(b) for b in batches)
        payloads: Iterator[bytes] = (p for batch in batches for p in batch)
        pending: deque[int] = deque()
        chan = self._chan
        state = {"done": False}

        def start(finish: Finish) -> None:
            def pump() -> None:
                while len(pending) < _WINDOW and not state["done"]:
                    payload = next(payloads, None)
                    if payload is None:
                        state["done"] = True
                        break
                    chan.basic_publish("", topic, payload, _PERSISTENT)
                    self._tag += 1
                    pending.append(self._tag)
                if state["done"] and not pending:
                    finish(None)

            def on_confirm(method: Any) -> None:
                if isinstance(method, pika.spec.Basic.Nack):
                    finish(BenchError(f"RabbitMQ nacked publish {method.delivery_tag}"))
                    return
                tag = method.delivery_tag
                if method.multiple:
                    while pending and pending[0] <= tag:
                        pending.popleft()
                elif pending and pending[0] == tag:
                    pending.popleft()
                else:
                    pending.remove(tag)
                pump()

            self._on_confirm = on_confirm
            pump()

        try:
            self._run(start, RECEIVE_TIMEOUT_S + count / 1000, "publishing")
        finally:
            self._on_confirm = None

    def consume(self, topic: str, count: int, op: str) -> None:
        """Consume with prefetch; multiple-ack every ``_ACK_EVERY``; cancel at ``count``."""
        chan = self._chan
        got = 0

        def start(finish: Finish) -> None:
            def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
                nonlocal got
                got += 1
                if got % _ACK_EVERY == 0 or got == count:
                    ch.basic_ack(method.delivery_tag, multiple=True)
                if got == count:
                    ch.basic_cancel(tag, callback=lambda _f: finish(None))

            tag = chan.basic_consume(topic, on_message, auto_ack=False)

        self._run(start, RECEIVE_TIMEOUT_S + count / 1000, "consuming")
        expect(got, count, "RabbitMQ consume")

    def cleanup(self, topic: str) -> None:
        """Delete the queue (reconnecting first if a failure closed the channel)."""
        try:
            self._ensure_open()
            self._run(
                lambda finish: self._chan.queue_delete(topic, callback=lambda _f: finish(None)),
                30.0,
                "queue_delete",
            )
        except (BenchError, pika.exceptions.AMQPError):
            pass  # a scratch queue left behind is harmless; the round's own error says what failed

    def close(self) -> None:
        """Close the connection."""
        if self._conn is None or self._conn.is_closed:
            return

        conn = self._conn
        result: list[None] = []

        def stopped() -> None:
            if not result:
                result.append(None)
                conn.ioloop.stop()

        conn.add_on_close_callback(lambda _c, _r: stopped())
        timer = conn.ioloop.call_later(10.0, stopped)
        conn.close()
        if not result:
            conn.ioloop.start()
        conn.ioloop.remove_timeout(timer)
