"""pika's SelectConnection on its own I/O thread, with a blocking facade for the caller's threads.

Everything that touches pika runs on the I/O thread; other threads hand it closures with
``Loop.run`` / ``Chan.rpc`` and wait on a ``Future``. When the connection or a channel closes,
every future still waiting on it fails with pika's own exception (``StreamLostError``,
``ChannelClosedByBroker``, ...), which the backend's ``_map_errors`` translates.

Why a thread and not ``BlockingConnection``: the client-side ack timeout has to fire while the
caller is not inside the library (a consumer that holds a delivery and does nothing else), and
publisher confirms must be pipelined over a window (BROKERS.md: SelectConnection ~3x Blocking).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import pika
import pika.exceptions

from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    InfeedError,
    PayloadTooLargeError,
    TopicNotFoundError,
)

#: One message ready for ``basic_publish``: exchange, routing key, body, properties.
Item = tuple[str, str, bytes, Any]

T = TypeVar("T")
#: What ``retry_on_loss`` runs on: a connection, or a channel's state.
H = TypeVar("H")


REPLY_ERRORS: dict[int, type[BrokerError]] = {404: TopicNotFoundError, 311: PayloadTooLargeError}

#: Bytes one socket read takes. pika reads 4 KiB at a time and appends each read to its frame
#: buffer (a copy of the buffer); draining 200 KB messages, 64 KiB reads cut the consumer's CPU
#: per message by ~35% (~17% for 3 KB messages). 64 KiB stays under glibc's mmap threshold.
RECV_BYTES = 1 << 16


@contextlib.contextmanager
def map_errors(url: str) -> Iterator[None]:
    """Translate pika's exceptions (and socket errors) into the infeed error tree."""
    try:
        yield
    except InfeedError:
        raise
    except pika.exceptions.ChannelClosedByBroker as exc:
        cls = REPLY_ERRORS.get(exc.reply_code, BrokerError)
        raise cls(f"RabbitMQ at {url} refused: {exc.reply_code} {exc.reply_text}") from exc
    except pika.exceptions.ConnectionBlockedTimeout as exc:
        raise BrokerTimeoutError(f"RabbitMQ at {url} blocked the connection (memory or disk alarm)") from exc
    except pika.exceptions.BodyTooLongError as exc:
        raise PayloadTooLargeError(f"message too large for RabbitMQ at {url}: {describe(exc)}") from exc
    except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError, OSError) as exc:
        raise BrokerConnectionError(f"lost RabbitMQ at {url}: {describe(exc)}") from exc
    except (pika.exceptions.AMQPError, pika.exceptions.ChannelError, pika.exceptions.ReentrancyError) as exc:
        raise BrokerError(f"RabbitMQ at {url} failed: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    try:
        return repr(exc)
    except Exception:  # some pika exceptions format args they were not given
        return type(exc).__name__


def is_connection_loss(exc: BaseException, loop: Loop | None) -> bool:
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return False
    if isinstance(
        exc, pika.exceptions.AMQPConnectionError | OSError | pika.exceptions.ChannelWrongStateError
    ):
        return True
    return isinstance(exc, pika.exceptions.AMQPError) and loop is not None and loop.closed


def retry_on_loss(
    attempts: int,
    connect: Callable[[], H],
    run: Callable[[H], T],
    loop_of: Callable[[H], Loop | None],
    give_up: Callable[[int, Exception], BrokerConnectionError],
) -> T:
    """Run ``run`` on what ``connect`` returns; after a connection loss, connect and run it again.

    Raises:
        BrokerConnectionError: ``give_up(failures, last_error)`` once the connection dropped
            ``attempts`` times.
    """
    failures = 0
    while True:
        held = connect()
        try:
            return run(held)
        except Exception as exc:
            if not is_connection_loss(exc, loop_of(held)):
                raise
            failures += 1
            if failures >= attempts:
                raise give_up(failures, exc) from exc


def wait(fut: Future[Any], timeout_s: float, what: str) -> Any:
    try:
        return fut.result(timeout_s)
    except FutureTimeout as exc:
        raise BrokerTimeoutError(f"RabbitMQ did not answer {what} within {timeout_s}s") from exc


def fail(fut: Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def resolve(fut: Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def read_larger(conn: Any) -> None:
    """Make an open connection's transport read ``RECV_BYTES`` a call (pika 1.x: ``_MAX_RECV_BYTES``)."""
    transport = getattr(conn, "_transport", None)
    if transport is not None and hasattr(transport, "_MAX_RECV_BYTES"):
        transport._MAX_RECV_BYTES = RECV_BYTES


class Loop:
    """One AMQP connection and the thread that drives it. Dead for good once closed."""

    def __init__(self, params: pika.ConnectionParameters, *, timeout_s: float, window: int) -> None:
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        #: streams known to run on this connection's node (see ``_rabbitmq_recovery``)
        self.ready_streams: set[str] = set()
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._closing = False
        self._opened: Future[None] = Future()
        self._conn: Any = None
        self._chans: set[Chan] = set()
        self.publisher = Publisher(self, window)
        self._thread = threading.Thread(target=self._run, args=(params,), name="infeed-amqp-io", daemon=True)
        self._thread.start()
        try:
            wait(self._opened, timeout_s, "the connection handshake")
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.error is not None or self._closing

    # -- the I/O thread ---------------------------------------------------------------------

    def _run(self, params: pika.ConnectionParameters) -> None:
        try:
            self._conn = pika.SelectConnection(
                params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_closed,
                on_close_callback=self._on_closed,
            )
            self._conn.ioloop.start()
        except BaseException as exc:  # a bug in the loop must not leave callers waiting
            self._on_closed(None, exc)
        finally:
            self._shutdown(self.error or pika.exceptions.ConnectionClosedByClient(200, "closed"))
            if self._conn is not None:
                self._conn.ioloop.close()

    def _on_open(self, conn: Any) -> None:
        read_larger(conn)
        resolve(self._opened, None)

    def _on_closed(self, _conn: Any, reason: BaseException | str) -> None:
        # pika passes a str for some open errors
        exc = pika.exceptions.AMQPConnectionError(reason) if isinstance(reason, str) else reason
        if self.error is None:
            self.error = exc
        self._shutdown(exc)
        if self._conn is not None:
            self._conn.ioloop.stop()

    def _shutdown(self, exc: BaseException) -> None:
        with self._lock:
            self._closing = True
            pending, self._pending = self._pending, set()
            chans, self._chans = self._chans, set()
        fail(self._opened, exc)
        for chan in chans:
            chan.on_close(exc)
        self.publisher.on_close(exc)
        for fut in list(pending):
            fail(fut, exc)

    # -- the callers' side ------------------------------------------------------------------

    def run(self, fn: Callable[[Future[Any]], None], *, track: bool = True) -> Future[Any]:
        """Call ``fn(future)`` on the I/O thread; ``fn`` (or a close) completes the future."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._closing:
                fail(fut, self.error or pika.exceptions.ConnectionWrongStateError("connection is closed"))
                return fut
            if track:
                self._pending.add(fut)
                fut.add_done_callback(self._untrack)
            self._conn.ioloop.add_callback_threadsafe(lambda: self._call(fn, fut))
        return fut

    def _untrack(self, fut: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)

    @staticmethod
    def _call(fn: Callable[[Future[Any]], None], fut: Future[Any]) -> None:
        if fut.done():
            return
        try:
            fn(fut)
        except BaseException as exc:
            fail(fut, exc)

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn()`` on the I/O thread and return its result."""
        return wait(self.run(lambda fut: resolve(fut, fn())), self.timeout_s, what)

    def soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the I/O thread, not waiting (acks); dropped if the connection is gone."""

        def go(fut: Future[Any]) -> None:
            fn()
            resolve(fut, None)

        self.run(go, track=False)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` on the I/O thread's timer (call from the I/O thread only)."""
        self._conn.ioloop.call_later(delay_s, fn)

    def channel(self) -> Chan:
        """Open a channel and return it once it is open."""
        chan = Chan(self)

        def start(fut: Future[Any]) -> None:
            with self._lock:
                self._chans.add(chan)
            chan.opening = fut
            self._conn.channel(on_open_callback=chan.on_open)

        wait(self.run(start), self.timeout_s, "a channel open")
        return chan

    def forget(self, chan: Chan) -> None:
        with self._lock:
            self._chans.discard(chan)

    def close(self) -> None:
        """Close the connection and join the I/O thread. Idempotent."""
        with self._lock:
            conn, closing = self._conn, self._closing
        if conn is not None and not closing:

            def close_conn() -> None:
                if conn.is_open or conn.is_opening:
                    conn.close()
                else:
                    conn.ioloop.stop()

            try:
                conn.ioloop.add_callback_threadsafe(close_conn)
            except Exception:  # the loop may be closing on its own right now
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(self.timeout_s)


class Chan:
    """One channel; ``rpc`` waits for a synchronous method's reply from another thread."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.impl: Any = None
        self.error: BaseException | None = None
        self.opening: Future[Any] | None = None
        self._waiting: set[Future[Any]] = set()
        #: called on the I/O thread with the reason, once, when the channel closes
        self.close_listeners: list[Callable[[BaseException], None]] = []

    @property
    def closed(self) -> bool:
        return self.error is not None or self.loop.closed

    def on_open(self, impl: Any) -> None:
        self.impl = impl
        impl.add_on_close_callback(lambda _ch, exc: self.on_close(exc))
        if self.opening is not None:
            resolve(self.opening, self)

    def on_close(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        self.error = exc
        self.loop.forget(self)
        waiting, self._waiting = self._waiting, set()
        for fut in list(waiting):
            fail(fut, exc)
        if self.opening is not None:
            fail(self.opening, exc)
        for listener in self.close_listeners:
            listener(exc)

    def rpc(self, start: Callable[[Callable[[Any], None]], None], what: str) -> Any:
        """Call ``start(reply)`` on the I/O thread (it issues one method) and wait for the reply."""

        def go(fut: Future[Any]) -> None:
            if self.error is not None:
                fail(fut, self.error)
                return
            self._waiting.add(fut)
            fut.add_done_callback(self._waiting.discard)
            start(lambda frame: resolve(fut, frame))

        return wait(self.loop.run(go), self.loop.timeout_s, what)

    def sync(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the pika channel ``method(*args, callback=..., **kwargs)`` and wait for its reply."""
        return self.rpc(lambda cb: method(*args, callback=cb, **kwargs), what)

    def close(self) -> None:
        """Close the channel (unacked deliveries go back to their queues) and wait for it."""
        if self.closed:
            return

        def go(fut: Future[Any]) -> None:
            if self.error is not None or self.impl is None or not self.impl.is_open:
                resolve(fut, None)
                return
            self.close_listeners.append(lambda _exc: resolve(fut, None))
            self.impl.close()

        try:
            wait(self.loop.run(go), self.loop.timeout_s, "a channel close")
        except Exception:  # the connection is going away anyway
            pass


class Job:
    __slots__ = ("done", "items", "left", "next", "ok")

    def __init__(self, items: Sequence[Item], done: Callable[[BaseException | None, Job], None]) -> None:
        self.items = items
        self.done = done
        self.next = 0
        self.left = len(items)
        #: confirmed[i]: the broker holds items[i]
        self.ok = bytearray(len(items))

    def unconfirmed(self) -> list[Item]:
        return [item for i, item in enumerate(self.items) if not self.ok[i]]


class Publisher:
    """Publishes on one confirm-mode channel, at most ``window`` unconfirmed messages in flight."""

    def __init__(self, loop: Loop, window: int) -> None:
        self.loop = loop
        self.window = window
        self._chan: Any = None
        self._opening = False
        self._tag = 0
        self._jobs: collections.deque[Job] = collections.deque()
        self._inflight: collections.OrderedDict[int, tuple[Job, int]] = collections.OrderedDict()

    # all of this runs on the I/O thread

    def submit(self, items: Sequence[Item], done: Callable[[BaseException | None, Job], None]) -> None:
        job = Job(items, done)
        if not items:
            done(None, job)
            return
        self._jobs.append(job)
        self._pump()

    def _pump(self) -> None:
        if self._chan is None or not self._chan.is_open:
            # Only on an open connection: pumping from a confirm callback while the connection is
            # closing (the broker died) must not raise inside pika's frame handling, nor leave
            # ``_opening`` set so that no channel is ever opened again.
            if not self._opening and self.loop._conn.is_open:
                self._opening = True
                try:
                    chan = self.loop._conn.channel(on_open_callback=self._on_open)
                except pika.exceptions.ConnectionWrongStateError:
                    self._opening = False
                    return
                chan.add_on_close_callback(self._on_channel_closed)  # also if it never opens
            return
        basic_publish = self._chan.basic_publish
        while self._jobs and len(self._inflight) < self.window:
            job = self._jobs[0]
            exchange, key, body, props = job.items[job.next]
            self._tag += 1
            self._inflight[self._tag] = (job, job.next)
            job.next += 1
            if job.next == len(job.items):
                self._jobs.popleft()
            basic_publish(exchange, key, body, props)

    def _on_open(self, chan: Any) -> None:
        chan.confirm_delivery(self._on_confirm, callback=lambda _f: self._on_ready(chan))

    def _on_ready(self, chan: Any) -> None:
        self._chan, self._tag, self._opening = chan, 0, False
        self._pump()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        tag = method.delivery_tag
        if method.multiple:
            settled = []
            while self._inflight and next(iter(self._inflight)) <= tag:
                settled.append(self._inflight.popitem(last=False)[1])
        else:
            one = self._inflight.pop(tag, None)
            settled = [one] if one is not None else []
        for job, index in settled:
            if nacked:
                self._finish(job, pika.exceptions.NackError([job.items[index]]))
                continue
            job.ok[index] = 1
            job.left -= 1
            if job.left == 0:
                self._finish(job, None)
        self._pump()

    def _finish(self, job: Job, exc: BaseException | None) -> None:
        done, job.done = job.done, _noop
        if exc is not None:
            # stop sending the rest of a failed job; its unconfirmed items are the caller's to retry
            try:
                self._jobs.remove(job)
            except ValueError:
                pass
        done(exc, job)

    def _on_channel_closed(self, _chan: Any, exc: BaseException) -> None:
        self._chan, self._opening = None, False
        failed = {id(job): job for job, _ in self._inflight.values()}
        self._inflight.clear()
        for job in failed.values():
            self._finish(job, exc)
        if self.loop.closed:
            self.on_close(exc)
        elif self._jobs:
            self._pump()  # jobs not yet started go out on a fresh channel

    def on_close(self, exc: BaseException) -> None:
        jobs = {id(job): job for job, _ in self._inflight.values()}
        jobs.update((id(job), job) for job in self._jobs)
        self._inflight.clear()
        self._jobs.clear()
        self._chan = None
        for job in jobs.values():
            self._finish(job, exc)


def _noop(_exc: BaseException | None, _job: Job) -> None:
    pass


def publish(loop: Loop, items: Sequence[Item]) -> tuple[Job, BaseException | None]:
    """Publish ``items`` from a caller's thread and wait for their confirms.

    Returns:
        the job (``job.unconfirmed()``: what the broker may not hold) and the pika error that
        stopped it, if any.
    """
    result: Future[tuple[Job, BaseException | None]] = Future()

    def start(fut: Future[Any]) -> None:
        loop.publisher.submit(items, lambda exc, job: resolve(result, (job, exc)))
        resolve(fut, None)

    try:
        # a connection that dies before the job reaches the publisher fails this future only
        wait(loop.run(start), loop.timeout_s, "the I/O thread taking a publish")
    except BrokerTimeoutError:
        raise
    except Exception as exc:
        return Job(items, _noop), exc
    timeout = loop.timeout_s + len(items) / 1000.0
    return wait(result, timeout, f"publisher confirms for {len(items)} messages")  # type: ignore[no-any-return]
