"""nats-py on JetStream: the baseline of ``nats://``.

Produce: ``publish_async`` with the acks of each window of 500 awaited while the next window is
sent (at most 1,000 in flight). Consume, two ways (both reported; the faster is the baseline):
``consume`` is a durable pull consumer, ``fetch(500)`` then one ack of the last message
(``AckPolicy.ALL`` makes it a multiple-ack); ``consume-push`` is a durable push subscription with a
callback that acks every 500th message (also ``AckPolicy.ALL``). nats-py is asyncio only: this
side owns a private event loop and runs it only while an operation runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, RawSide, expect

__all__ = ["NATSRaw"]

_BATCH = 500
#: Unacked messages the server lets a consumer hold (AckPolicy.ALL acks every 500).
_MAX_ACK_PENDING = 20_000

T = TypeVar("T")


class NATSRaw(RawSide):
    """nats-py JetStream: windowed publish_async; pull fetch 500 + ack, and push."""

    label = (
        "nats-py JetStream: publish_async, acks awaited per window of 500 (1000 in flight); "
        "pull fetch 500 + AckAll of the last | push subscription, AckAll every 500"
    )
    consume_ops = ("consume", "consume-push")

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        self._loop = asyncio.new_event_loop()
        self._nc = self._call(nats.connect(self._require_url(), connect_timeout=10))
        self._js = self._nc.jetstream()
        self._pull: dict[str, Any] = {}

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    @staticmethod
    def _config(durable: str) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.ALL, max_ack_pending=_MAX_ACK_PENDING
        )

    def prepare(self, topic: str) -> None:
        """Create a stream ``topic`` on subject ``topic`` and its durable pull consumer."""

        async def go() -> Any:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self._js.delete_stream(topic)
            await self._js.add_stream(name=topic, subjects=[topic])
            return await self._js.pull_subscribe(
                topic, durable="pull", stream=topic, config=self._config("pull")
            )

        self._pull[topic] = self._call(go())

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """Publish each window with publish_async; await its acks after sending the next."""

        async def go() -> None:
            previous: list[asyncio.Future[Any]] = []
            for batch in batches:
                current = [await self._js.publish_async(topic, payload) for payload in batch]
                if previous:
                    await asyncio.gather(*previous)
                previous = current
            await asyncio.gather(*previous)

        self._call(go())

    def consume(self, topic: str, count: int, op: str) -> None:
        """Read ``count`` messages with the pull consumer (``consume``) or a push subscription."""
        if op == "consume":
            got = self._call(self._consume_pull(topic, count))
        elif op == "consume-push":
            got = self._call(self._consume_push(topic, count))
        else:
            raise ValueError(f"unknown NATS consume variant {op!r}")
        expect(got, count, f"NATS {op}")

    async def _consume_pull(self, topic: str, count: int) -> int:
        sub = self._pull[topic]
        got = 0
        while got < count:
            try:
                msgs = await sub.fetch(min(_BATCH, count - got), timeout=RECEIVE_TIMEOUT_S)
            except nats.errors.TimeoutError:
                break
            await msgs[-1].ack()
            got += len(msgs)
        return got

    async def _consume_push(self, topic: str, count: int) -> int:
        done: asyncio.Future[None] = self._loop.create_future()
        got = 0

        async def on_message(msg: Msg) -> None:
            nonlocal got
            got += 1
            if got % _BATCH == 0 or got == count:
                await msg.ack()
            if got == count and not done.done():
                done.set_result(None)

        sub = await self._js.subscribe(
            topic,
            durable="push",
            stream=topic,
            cb=on_message,
            manual_ack=True,
            config=self._config("push"),
            pending_msgs_limit=_MAX_ACK_PENDING,
        )
        try:
            await asyncio.wait_for(done, RECEIVE_TIMEOUT_S + count / 1000)
        except TimeoutError:
            raise BenchError(f"NATS push consumer got {got} of {count} messages") from None
        finally:
            await sub.unsubscribe()
        return got

    def cleanup(self, topic: str) -> None:
        """Delete the stream with its consumers."""
        sub = self._pull.pop(topic, None)

        async def go() -> None:
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            with contextlib.suppress(nats.errors.Error):
                await self._js.delete_stream(topic)

        self._call(go())

    def close(self) -> None:
        """Close the connection and the event loop."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(nats.errors.Error):
            self._call(self._nc.close())
        self._loop.close()
