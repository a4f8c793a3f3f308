"""The serving end of figure 5, run in its own process (or, for ``memory://``, a thread).

``python -m infeed.bench._infer_serve infeed URL REGISTRY MODEL MAX_WAIT_S`` serves ``MODEL`` with
an infeed ``Worker`` (one priority level, no version following, one torch thread);
``python -m infeed.bench._infer_serve raw ENGINE URL CHANNEL`` answers a raw channel
(``infeed.bench._echo``) with the same model. Each writes ``ready`` on stdout once it listens and
stops on SIGTERM, when stdin closes, or when its parent is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from infeed.bench.baselines import BenchError
from infeed.brokers import Broker
from infeed.inference import BatchConfig, ModelRegistry, Worker, WorkerConfig

__all__ = ["Server", "main", "mlp_handler", "serve_infeed", "worker_config"]

_POLL_S = 0.2
#: Seconds a serving process may take to start (it imports torch).
_START_S = 120.0


def worker_config(max_wait_s: float, max_batch_size: int = 32) -> WorkerConfig:
    """Return the bench's worker settings: one priority level, no version following, one thread."""
    return WorkerConfig(
        batch=BatchConfig(max_batch_size=max_batch_size, max_wait_s=max_wait_s),
        priorities=1,
        events_topic=None,
        torch_threads=1,
    )


def serve_infeed(
    broker: Broker, root: str, model: str, max_wait_s: float, stop: threading.Event, ready: threading.Event
) -> None:
    """Serve ``model`` from the registry at ``root`` until ``stop`` is set."""
    with Worker(broker, ModelRegistry(root), model, config=worker_config(max_wait_s)) as worker:
        ready.set()
        while not stop.is_set():
            worker.run_once(timeout_s=_POLL_S)


def mlp_handler() -> Callable[[bytes], bytes]:
    """Return a handler running mlp-784 (seeded): request bytes (784 float32) -> output bytes (10 float32)."""
    from infeed.training.models import mlp_784

    torch.manual_seed(0)
    model = mlp_784().eval()

    def handle(payload: bytes) -> bytes:
        # A copy, as the worker's batch stacking makes one: torch wants a writable buffer.
        x = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(1, 784).copy())
        with torch.inference_mode():
            out: bytes = model(x).numpy().tobytes()
            return out

    return handle


class Server:
    """A serving end: a process (``python -m infeed.bench._infer_serve ...``) or, for memory://, a thread."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        with open(log, "w", encoding="utf-8") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infeed.bench._infer_serve", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def in_thread(cls, broker: Broker, root: str, model: str, max_wait_s: float) -> Server:
        self = cls.__new__(cls)
        self.ready, self.stop, self.proc = threading.Event(), threading.Event(), None
        self.log = Path("(thread)")
        self.thread = threading.Thread(
            target=serve_infeed, args=(broker, root, model, max_wait_s, self.stop, self.ready), daemon=True
        )
        self.thread.start()
        return self

    def _read(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            for line in self.proc.stdout:
                if line.strip() == "ready":
                    self.ready.set()

    def wait_ready(self) -> None:
        end = time.monotonic() + _START_S
        while not self.ready.wait(0.1):
            dead = self.proc.poll() is not None if self.proc else not (self.thread and self.thread.is_alive())
            if dead or time.monotonic() > end:
                tail = self.log.read_text(errors="replace")[-500:] if self.proc else ""
                raise BenchError(f"a serving process did not start: {tail}")

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _watch(stop: threading.Event, parent: int) -> None:
    while not stop.wait(_POLL_S):
        if os.getppid() != parent:
            stop.set()


def _until_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until stopped; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    stop, ready = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    threading.Thread(target=_watch, args=(stop, os.getppid()), daemon=True).start()
    threading.Thread(target=_until_eof, args=(stop,), daemon=True).start()
    torch.set_num_threads(1)
    if len(args) == 5 and args[0] == "infeed":
        from infeed.brokers import connect

        _, url, root, model, wait_s = args
        with connect(url) as broker:
            thread = threading.Thread(
                target=serve_infeed, args=(broker, root, model, float(wait_s), stop, ready), daemon=True
            )
            thread.start()
            while not ready.wait(0.05):
                if not thread.is_alive():
                    return 1
            print("ready", flush=True)
            thread.join()
        return 0
    if len(args) == 4 and args[0] == "raw":
        from infeed.bench._echo import raw_echo

        _, engine, url, channel = args
        handle = mlp_handler()
        echo = raw_echo(engine, url, channel)
        try:
            print("ready", flush=True)
            echo.serve(handle, stop)
        finally:
            echo.close()
        return 0
    print(
        "usage: python -m infeed.bench._infer_serve "
        "infeed URL REGISTRY MODEL MAX_WAIT_S | raw ENGINE URL CHANNEL",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
