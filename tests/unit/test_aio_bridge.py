"""The sync-over-asyncio adapter that asyncio-only client libraries run behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from infeed.brokers._aio import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread("test-aio")
    yield lt
    lt.close()


async def _add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def _fail() -> None:
    raise KeyError("inside")


def test_run_returns_the_result_from_the_loop_thread(loop_thread: LoopThread) -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert loop_thread.run(_add(2, 3)) == 5
    assert loop_thread.run(where()) == "test-aio"


def test_exceptions_propagate_unchanged(loop_thread: LoopThread) -> None:
    with pytest.raises(KeyError, match="inside"):
        loop_thread.run(_fail())


def test_timeout_raises_and_cancels_the_coroutine(loop_thread: LoopThread) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        loop_thread.run(forever(), timeout_s=0.05)
    assert cancelled.wait(5.0)
    assert loop_thread.run(_add(1, 1)) == 2  # the loop still serves


def test_state_lives_on_one_loop_across_calls(loop_thread: LoopThread) -> None:
    async def make() -> asyncio.Queue[int]:
        return asyncio.Queue()

    queue = loop_thread.run(make())
    loop_thread.run(queue.put(7))
    assert loop_thread.run(queue.get()) == 7


def test_many_threads_can_call_at_once(loop_thread: LoopThread) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: loop_thread.run(_add(i, i)), range(200)))
    assert results == [2 * i for i in range(200)]


def test_run_from_the_loop_thread_is_refused(loop_thread: LoopThread) -> None:
    async def nested() -> None:
        loop_thread.run(_add(1, 2))

    with pytest.raises(RuntimeError, match="deadlock"):
        loop_thread.run(nested())


def test_close_cancels_background_tasks_joins_and_is_idempotent() -> None:
    lt = LoopThread()
    cleaned = threading.Event()

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    lt.submit(background())
    lt.run(asyncio.sleep(0))
    thread = lt._thread
    assert thread.daemon
    lt.close()
    lt.close()
    assert cleaned.is_set()
    assert not thread.is_alive()
    assert lt.closed
    assert lt.loop.is_closed()


def test_run_after_close_is_refused_without_leaking_the_coroutine() -> None:
    lt = LoopThread()
    lt.close()
    # An un-awaited coroutine would warn (an error under filterwarnings=error) when collected.
    with pytest.raises(RuntimeError, match="closed"):
        lt.run(_add(1, 2))


def test_a_call_in_flight_when_the_loop_closes_fails_instead_of_hanging() -> None:
    lt = LoopThread()
    started = threading.Event()

    async def slow() -> None:
        started.set()
        await asyncio.Event().wait()

    errors: list[BaseException] = []

    def call() -> None:
        try:
            lt.run(slow())
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(5.0)
    lt.close()
    caller.join(5.0)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
