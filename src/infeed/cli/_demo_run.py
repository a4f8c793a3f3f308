"""The live demo: stream digits, train online, publish versions, serve them hot-reloaded, measure.

Threads of this process: a producer streams the training split into a topic as record batches at
a steady pace; the ``Trainer`` learns from it through a ``QueueDataset`` and every
``checkpoint_every_steps`` writes a checkpoint, publishes the weights as a model version and
announces it on the model-events topic; a sender submits held-out samples at a steady rate
through a ``Client``. Beside them run ``workers`` inference worker processes
(``infeed.cli._demo_worker``) that load each announced version and swap it in between batches.
Once training ends and the last version answers, the whole held-out set is sent at once, pinned
to that version. Every subprocess is stopped on the way out, on error and on Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infeed.cli._demo_view import DemoStats

if TYPE_CHECKING:
    from infeed.brokers import Broker
    from infeed.inference import Client, Reply

__all__ = ["DEMO_MODEL", "DemoConfig", "DemoError", "run"]

#: The model's name in the registry and on the request topics.
DEMO_MODEL = "digits"
#: The training topic.
TRAIN_TOPIC = "demo.train"
#: The model: ``mlp(64, [64], 10)``.
MODEL_FACTORY = "infeed.training.models:mlp"
MODEL_KWARGS: dict[str, Any] = {"in_features": 64, "hidden": [64], "out_features": 10}
#: Seconds a worker may take to start (importing torch on a loaded machine is slow).
WORKER_START_S = 90.0
#: Seconds to wait for the last version to answer once training ended.
LAST_VERSION_S = 30.0
#: Seconds a worker has to leave after SIGTERM before it is killed.
WORKER_STOP_S = 10.0


class DemoError(RuntimeError):
    """The demo could not run to the end (a worker died, a thread failed, nothing came back)."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """How big the demo is.

    Attributes:
        steps: training steps (the producer streams ``steps * batch_size`` samples).
        batch_size: samples per step.
        checkpoint_every_steps: a checkpoint, and a model version, every this many steps.
        samples_per_s: the producer's pace.
        requests_per_s: the sender's steady rate.
        workers: inference worker processes.
        held_out: samples kept out of training for evaluation.
        records_per_message: samples per message of the training topic.
        lr: Adam's learning rate.
        seed: seed of the split, the stream order and the initial weights.
    """

    steps: int = 160
    batch_size: int = 64
    checkpoint_every_steps: int = 20
    samples_per_s: float = 500.0
    requests_per_s: float = 100.0
    workers: int = 2
    held_out: int = 360
    records_per_message: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "checkpoint_every_steps",
            "workers",
            "held_out",
            "records_per_message",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("samples_per_s", "requests_per_s", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smaller run (for tests): fewer steps, a faster stream."""
        return cls(
            steps=60, checkpoint_every_steps=15, samples_per_s=800.0, requests_per_s=80.0, held_out=200
        )


class _Workers:
    """Worker subprocesses: started, watched, and always stopped."""

    def __init__(self, url: str, registry: Path, logs: Path, count: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = [logs / f"worker-{i}.log" for i in range(count)]
        self.ready = [threading.Event() for _ in range(count)]
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            with open(self.logs[i], "w", encoding="utf-8") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "infeed.cli._demo_worker", url, str(registry), DEMO_MODEL],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    start_new_session=True,  # Ctrl-C reaches this process only; it stops them in order
                )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(i,), daemon=True).start()

    def _read(self, i: int) -> None:
        stdout = self.procs[i].stdout
        if stdout is None:
            return
        for line in stdout:
            if line.strip() == "ready":
                self.ready[i].set()

    def wait_ready(self, deadline_s: float, failed: threading.Event) -> None:
        end = time.monotonic() + deadline_s
        for i, event in enumerate(self.ready):
            while not event.wait(0.1):
                self.check()
                if failed.is_set():
                    return
                if time.monotonic() > end:
                    raise DemoError(f"worker {i} did not start within {deadline_s:.0f} s: {self.tail(i)}")

    def check(self) -> None:
        """Raise DemoError if a worker has exited."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise DemoError(f"worker {i} exited with status {proc.returncode}: {self.tail(i)}")

    def tail(self, i: int) -> str:
        try:
            lines = self.logs[i].read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM every worker, wait, SIGKILL what is left. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + WORKER_STOP_S
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Run:
    def __init__(self, broker: Broker, url: str, work: Path, config: DemoConfig, stats: DemoStats) -> None:
        from infeed.cli._digits import load_digits

        self.broker, self.url, self.work, self.config, self.stats = broker, url, work, config, stats
        x, y = load_digits()
        x = (x / 16.0).astype(np.float32)
        order = np.random.default_rng(config.seed).permutation(len(x))
        test, train = order[: config.held_out], order[config.held_out :]
        if len(train) < config.batch_size:
            raise ValueError(f"held_out={config.held_out} leaves too few samples to train on")
        self.x_train, self.y_train = x[train], y[train]
        self.x_test, self.y_test = x[test], y[test]
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.stop_sending = threading.Event()
        self.futures: list[Future[Reply]] = []
        self.trainer: Any = None

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(exc)
                self.failed.set()

        t = threading.Thread(target=body, name=f"demo-{name}", daemon=True)
        t.start()
        return t

    def check(self, workers: _Workers) -> None:
        if self.errors:
            exc = self.errors[0]
            raise DemoError(f"{type(exc).__name__}: {exc}") from exc
        workers.check()

    # -- producer ----------------------------------------------------------------------------

    def produce(self) -> None:
        from infeed.cli.datasets import DIGITS_SCHEMA
        from infeed.codecs import RecordBatch, Schema
        from infeed.streams import Producer

        cfg = self.config
        total = cfg.steps * cfg.batch_size
        rng = np.random.default_rng(cfg.seed + 1)
        n = len(self.x_train)
        ids = np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / n))])[:total]
        chunk = cfg.records_per_message
        schema = Schema.from_dict(DIGITS_SCHEMA)
        started = time.monotonic()
        with Producer(self.broker, TRAIN_TOPIC, schema=schema, records_per_message=chunk) as producer:
            for start in range(0, total, chunk):
                if self.stop.is_set():
                    return
                sel = ids[start : start + chunk]
                producer.send_batch(
                    RecordBatch({"x": self.x_train[sel], "y": self.y_train[sel], "id": sel.astype(np.int64)})
                )
                producer.flush()
                self.stats.on_produced(len(sel))
                due = started + (start + len(sel)) / cfg.samples_per_s
                self.stop.wait(max(0.0, due - time.monotonic()))

    # -- trainer -----------------------------------------------------------------------------

    def make_trainer(self, registry: Any) -> None:
        import torch

        from infeed.cli.datasets import DIGITS_SCHEMA
        from infeed.codecs import Schema
        from infeed.training import QueueDataset, Trainer
        from infeed.training.models import mlp

        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = mlp(**MODEL_KWARGS)
        registry.publish(DEMO_MODEL, model, version=0, factory=MODEL_FACTORY, kwargs=MODEL_KWARGS)
        self.stats.on_version(0, 0, math.nan)
        dataset = QueueDataset(
            self.broker,
            TRAIN_TOPIC,
            group="demo.trainer",
            schema=Schema.from_dict(DIGITS_SCHEMA),
            batch_size=cfg.batch_size,
            idle_timeout_s=60.0,
        )

        def on_phase(phase: str, step: int) -> None:
            if phase == "announced":
                self.stats.on_version(step, step, self.trainer.last_loss)

        self.trainer = Trainer(
            model,
            torch.optim.Adam(model.parameters(), lr=cfg.lr),
            torch.nn.functional.cross_entropy,
            dataset,
            checkpoint_dir=self.work / "checkpoints",
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            max_steps=cfg.steps,
            registry=registry,
            model_name=DEMO_MODEL,
            model_factory=MODEL_FACTORY,
            model_kwargs=MODEL_KWARGS,
            on_step=lambda info: self.stats.on_step(info.step, info.samples, info.loss),
            on_checkpoint_phase=on_phase,
        )

    def train(self) -> None:
        with self.trainer.dataset:
            self.trainer.fit()

    # -- client ------------------------------------------------------------------------------

    def _done(self, index: int, sent_at: float, final: bool, future: Future[Reply]) -> None:
        from infeed.errors import DeadlineExceededError

        latency = time.monotonic() - sent_at
        if future.cancelled():
            self.stats.on_failure(timeout=True)
            return
        exc = future.exception()
        if exc is not None:
            self.stats.on_failure(timeout=isinstance(exc, DeadlineExceededError))
            return
        reply = future.result()
        predicted = int(np.argmax(reply.outputs["output"][0]))
        version = -1 if reply.model_version is None else reply.model_version
        self.stats.on_reply(version, predicted == int(self.y_test[index]), latency, final=final)

    def submit(self, client: Client, index: int, *, final: bool, pin: int | None = None) -> None:
        sent_at = time.monotonic()
        future = client.submit(self.x_test[index : index + 1], model_version=pin)
        self.stats.on_sent()
        future.add_done_callback(functools.partial(self._done, index, sent_at, final))
        self.futures.append(future)

    def send_steadily(self, client: Client) -> None:
        interval = 1.0 / self.config.requests_per_s
        order = np.random.default_rng(self.config.seed + 2).permutation(len(self.x_test))
        due = time.monotonic()
        i = 0
        while not self.stop_sending.is_set():
            self.submit(client, int(order[i % len(order)]), final=False)
            i += 1
            now = time.monotonic()
            due = max(due + interval, now - 1.0)  # a stall does not turn into a long burst
            self.stop_sending.wait(max(0.0, due - now))

    def evaluate(self, client: Client, version: int) -> None:
        """Send the whole held-out set at once, pinned to ``version``; wait for every reply."""
        self.stats.final.version = version
        started = time.monotonic()
        first = len(self.futures)
        for i in range(len(self.x_test)):
            self.submit(client, i, final=True, pin=version)
        wait(self.futures[first:])
        self.stats.final.seconds = time.monotonic() - started


def _wait(
    run: _Run, workers: _Workers, tick: Callable[[], None], until: Callable[[], bool], limit_s: float
) -> bool:
    end = time.monotonic() + limit_s
    while not until():
        run.check(workers)
        if time.monotonic() > end:
            return False
        tick()
        time.sleep(0.05)
    return True


def run(url: str, work: Path, config: DemoConfig, stats: DemoStats, tick: Callable[[], None]) -> None:
    """Run the demo end to end against the broker at ``url`` (files under ``work``).

    Args:
        url: a broker reachable from other processes (the workers).
        work: folder for the registry, checkpoints and worker logs.
        config: the demo's size.
        stats: filled as the run goes.
        tick: called often from this thread (redraws the display).

    Raises:
        DemoError: a worker or thread failed, or the last version never answered.
        KeyboardInterrupt: Ctrl-C (everything was stopped before it propagates).
    """
    from infeed.brokers import connect
    from infeed.inference import Client, ClientConfig, ModelRegistry, request_topic
    from infeed.types import Capability

    broker = connect(url)
    workers: _Workers | None = None
    client: Client | None = None
    r: _Run | None = None
    threads: list[threading.Thread] = []
    try:
        if not broker.supports(Capability.MULTI_PROCESS):
            raise DemoError(f"the demo's workers are processes: {url} cannot be shared between processes")
        r = _Run(broker, url, work, config, stats)
        stats.target_samples = config.steps * config.batch_size
        existing = broker.list_topics()
        for topic in (TRAIN_TOPIC, request_topic(DEMO_MODEL, 0)):  # a broker other than the fresh file
            if topic in existing:
                broker.delete_topic(topic)
        broker.create_topic(TRAIN_TOPIC, partitions=1)
        registry = ModelRegistry(work / "models")
        r.make_trainer(registry)
        workers = _Workers(url, registry.root, work / "logs", config.workers)
        workers.wait_ready(WORKER_START_S, r.failed)
        client = Client(broker, DEMO_MODEL, config=ClientConfig(timeout_s=15.0))
        stats.phase = "training and serving"
        threads.append(r.thread(functools.partial(r.send_steadily, client), "sender"))
        threads.append(r.thread(r.produce, "producer"))
        trainer = r.thread(r.train, "trainer")
        threads.append(trainer)
        _wait(r, workers, tick, lambda: not trainer.is_alive(), math.inf)
        r.check(workers)
        last = r.trainer.step
        stats.phase = f"waiting for version {last} to answer"
        if not _wait(r, workers, tick, lambda: (stats.serving_version() or 0) >= last, LAST_VERSION_S):
            raise DemoError(f"version {last} was published but gave no reply within {LAST_VERSION_S:.0f} s")
        time.sleep(0.5)  # half a second of steady traffic on the last version, for the plot
        r.stop_sending.set()
        stats.phase = f"evaluating version {last} on the whole held-out set"
        steady = list(r.futures)
        evaluation = r.thread(functools.partial(r.evaluate, client, last), "evaluate")
        threads.append(evaluation)
        _wait(r, workers, tick, lambda: not evaluation.is_alive() and all(f.done() for f in steady), 60.0)
        r.check(workers)
        stats.duplicates = client.duplicates
        stats.finish("done")
        tick()
    finally:
        if r is not None:
            r.stop.set()
            r.stop_sending.set()
            if r.trainer is not None:
                r.trainer.stop()
        for t in threads:
            t.join(timeout=10.0)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if workers is not None:
            workers.stop()
            stats.workers = [{"pid": p.pid, "exit": p.returncode} for p in workers.procs]
        broker.close()


def fresh_sqlite(path: Path) -> None:
    """Delete the SQLite database at ``path`` with its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
