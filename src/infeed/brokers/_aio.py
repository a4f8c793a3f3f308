"""A thin sync-over-asyncio adapter for client libraries that only speak asyncio.

The broker contract is synchronous (base.py). A backend whose client library is asyncio-only
(nats-py, ...) owns one :class:`LoopThread`: an event loop running in a daemon thread. Sync code
hands coroutines to it with :meth:`LoopThread.run` and blocks on the result; everything the client
library touches stays on that one loop, so the library needs no locks and its background tasks
(socket reader, pings, reconnects) keep running between calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")

#: How long ``close`` waits for the loop thread to finish its clean-up.
DEFAULT_CLOSE_TIMEOUT_S = 10.0


class LoopThread:
    """One asyncio event loop in a daemon thread, driven from synchronous code.

    Safe to call from any number of threads (but not from the loop's own thread, which would
    wait on itself).
    """

    def __init__(self, name: str = "infeed-aio") -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop (for ``call_soon_threadsafe`` and friends)."""
        return self._loop

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def in_loop_thread(self) -> bool:
        """Return whether the caller runs on the loop's thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop and return a future of its result.

        Raises:
            RuntimeError: if the loop is closed (the coroutine is closed, not leaked).
        """
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("the event loop thread is closed")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception).

        Args:
            coro: the coroutine.
            timeout_s: give up after this many seconds (None: wait as long as it takes). On
                timeout the coroutine is cancelled on the loop.

        Raises:
            TimeoutError: if ``timeout_s`` passed first.
            RuntimeError: if called from the loop's own thread, or after :meth:`close`.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop thread (it would deadlock)")
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout_s} s") from None
        except concurrent.futures.CancelledError:
            raise RuntimeError("the event loop thread was closed while the call was running") from None
        except BaseException:
            # KeyboardInterrupt while waiting: do not leave the coroutine running behind us.
            future.cancel()
            raise

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Cancel what still runs on the loop, stop it, join the thread, close the loop.

        Idempotent. Run your own asynchronous clean-up (closing connections) with :meth:`run`
        first: tasks still pending here are cancelled.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        if not self.in_loop_thread():
            self._thread.join(timeout_s)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        loop = self._loop
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
