"""The timed loops of ``bench train-feed``, each returning one :class:`Run`.

The loops: over tensors in memory, ``QueueDataset`` with and without the ``Trainer``, and the two
hand-written loops.

See :mod:`infeed.bench.train_feed` for what is measured and how the runs are paired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infeed import _procfs as procfs
from infeed.brokers import Broker
from infeed.codecs import Field, RecordBatch, Schema, decode_message, default_registry
from infeed.streams import Producer

if TYPE_CHECKING:  # torch is an extra: imported when a run starts, not with the bench CLI
    import torch

    from infeed.training import StepInfo

__all__ = ["BATCH", "SCHEMA", "PeakRss", "Run", "fill", "hand", "infeed", "infeed_stream", "tensors"]

#: Records per step (mlp-784's batch).
BATCH = 256
SCHEMA = Schema({"x": Field("float32", (784,)), "y": Field("int64")})


@dataclass
class Run:
    """One timed run: its clocked span, what it trained and what it cost."""

    seconds: float
    samples: int
    wait_s: float = 0.0
    compute_s: float = 0.0
    rss_peak_bytes: int | None = None
    startup_s: float = 0.0
    checkpoint_each_s: float | None = None
    cpu_s: float = 0.0  # process CPU time over the clocked span (every thread)
    broker_cpu_s: float | None = None  # the broker's processes, whole run (None: in-process backend)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    @property
    def stall(self) -> float | None:
        busy = self.wait_s + self.compute_s
        return self.wait_s / busy if busy else None


class PeakRss:
    """Peak resident-set growth over a block, from the kernel's high-water marks: nothing samples.

    On entry this process's mark is reset to its current resident set (``/proc/self/clear_refs``);
    on exit :attr:`growth` is the mark minus that start, plus the lifetime peak of each child
    (a dataset's feed process) seen by :meth:`note_children`, which the run calls while they live.
    A sampling thread would take the GIL and a share of a core from the very loop it measures.
    :attr:`growth` stays ``None`` where the kernel offers no such marks (not Linux).
    """

    def __init__(self) -> None:
        self.growth: int | None = None
        self._start: int | None = None
        self._children: dict[int, int] = {}

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = procfs.status_bytes("self", "VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        peak = procfs.status_bytes("self", "VmHWM") if self._start is not None else None
        if peak is not None and self._start is not None:
            self.growth = peak - self._start + sum(self._children.values())

    def note_children(self) -> None:
        """Record each child process's peak so far (call while they still run)."""
        own = procfs.cmdline("self")
        for pid in procfs.children("self"):
            # A child forked but not yet exec'd shares (and shows) all of this process's pages.
            if procfs.cmdline(pid) not in (own, None):
                peak = procfs.status_bytes(pid, "VmHWM")
                if peak is not None:
                    self._children[pid] = max(peak, self._children.get(pid, 0))


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import torch

    from infeed.training.models import mlp_784

    torch.manual_seed(0)
    model = mlp_784()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    import torch

    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    torch.autograd.backward(loss)
    opt.step()
    return float(loss.detach())


def tensors(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Run:
    """The baseline: the same steps over tensors already in memory."""
    import torch

    model, opt = _model()
    xs, ys = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    with PeakRss() as rss:
        started, cpu = time.perf_counter(), time.process_time()
        compute = 0.0
        for start in range(0, len(xs), BATCH):
            t = time.perf_counter()
            _step(model, opt, xs[start : start + BATCH], ys[start : start + BATCH])
            compute += time.perf_counter() - t
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Run(seconds, len(xs), 0.0, compute, rss.growth, cpu_s=cpu)


def infeed(broker: Broker, topic: str, group: str, every: int | None, workdir: Path, feed: str) -> Run:
    """``QueueDataset`` under the ``Trainer``: a checkpoint every ``every`` steps (``None``: at the end)."""
    import torch

    from infeed.training import QueueDataset, Trainer

    model, opt = _model()
    last = [0.0, 0.0]  # wall, CPU of this process
    first = [0.0, 0.0]
    feed_cpu = [0.0, 0.0]  # the feed process's CPU at the first step and once the last ended
    busy = [0.0, 0.0]  # wait, compute: after the first batch (whose wait is the startup)
    datasets: list[QueueDataset] = []

    def on_step(info: StepInfo) -> None:
        last[0], last[1] = time.perf_counter(), time.process_time()
        if info.step == 1:
            first[0], first[1] = last[0] - info.compute_s, last[1] - info.compute_s
            feed_cpu[0] = datasets[0].feed_cpu_s()  # read once, not every step: it costs a /proc read
        else:
            busy[0] += info.data_wait_s
        busy[1] += info.compute_s

    with PeakRss() as rss:
        started = time.perf_counter()
        with QueueDataset(
            broker, topic, group=group, schema=SCHEMA, batch_size=BATCH, epochs=1, feed=feed
        ) as ds:
            datasets.append(ds)
            trainer = Trainer(
                model,
                opt,
                torch.nn.functional.cross_entropy,
                ds,
                checkpoint_dir=workdir / f"ckpt-{topic}-{group}",
                checkpoint_every_steps=every,
                on_step=on_step,
            )
            result = trainer.fit()
            feed_cpu[1] = ds.feed_cpu_s()  # (after the final checkpoint, while the feed idles)
            rss.note_children()
    each = result.checkpoint_s / result.checkpoints if result.checkpoints else None
    return Run(
        last[0] - first[0],
        result.samples,
        busy[0],
        busy[1],
        rss.growth,
        first[0] - started,
        each,
        last[1] - first[1] + feed_cpu[1] - feed_cpu[0],
    )


def infeed_stream(broker: Broker, topic: str, group: str, samples: int) -> Run:
    """``QueueDataset`` on a broker without seek: the same steps, no Trainer (it cannot resume exactly)."""
    from infeed.training import QueueDataset

    model, opt = _model()
    wait = compute = 0.0
    with PeakRss() as rss:
        started = time.perf_counter()
        got = 0
        first = cpu0 = 0.0
        with QueueDataset(
            broker, topic, group=group, schema=SCHEMA, batch_size=BATCH, idle_timeout_s=5.0
        ) as ds:
            t0 = time.perf_counter()
            for batch in ds:
                t1 = time.perf_counter()
                if not got:
                    first, cpu0 = t1, time.process_time()
                else:
                    wait += t1 - t0
                _step(model, opt, batch["x"], batch["y"])
                t0 = time.perf_counter()
                compute += t0 - t1
                got += len(batch["y"])
                if got >= samples:
                    break
            seconds, cpu = time.perf_counter() - first, time.process_time() - cpu0
    return Run(seconds, got, wait, compute, rss.growth, first - started, cpu_s=cpu)


def hand(broker: Broker, topic: str, group: str, samples: int, per_receive: int) -> Run:
    """The loop people write: receive, decode, stack, step, ack (``per_receive`` messages a call)."""
    import torch

    model, opt = _model()
    codecs = default_registry()
    wait = compute = 0.0
    with PeakRss() as rss:
        started = time.perf_counter()
        consumer = broker.subscribe(topic, group=group, start="earliest")
        got = 0
        startup = first = cpu0 = 0.0
        xs: list[np.ndarray[Any, Any]] = []
        ys: list[np.ndarray[Any, Any]] = []
        held = 0
        t0 = time.perf_counter()
        while got < samples:
            deliveries = consumer.receive(max_messages=per_receive, timeout_s=1.0)
            for d in deliveries:
                batch = decode_message(d.payload, d.headers, codecs)
                xs.append(batch.columns["x"])
                ys.append(batch.columns["y"])
                held += len(batch)
            consumer.ack(deliveries)
            if held >= BATCH or (deliveries and got + held >= samples):
                x, y = np.concatenate(xs), np.concatenate(ys)
                t1 = time.perf_counter()
                if not got:
                    startup, first, cpu0 = t1 - started, t1, time.process_time()
                else:
                    wait += t1 - t0
                _step(model, opt, torch.from_numpy(x), torch.from_numpy(y))
                t2 = time.perf_counter()
                compute += t2 - t1
                got += held
                xs, ys, held, t0 = [], [], 0, t2
        seconds, cpu = time.perf_counter() - first, time.process_time() - cpu0
        consumer.close()
    return Run(seconds, got, wait, compute, rss.growth, startup, cpu_s=cpu)


def fill(broker: Broker, topic: str, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], per: int) -> None:
    """Publish ``x`` and ``y`` to ``topic``, ``per`` records a message."""
    with Producer(broker, topic, records_per_message=per, messages_per_publish=500) as producer:
        producer.send_batch(RecordBatch({"x": x, "y": y}))
