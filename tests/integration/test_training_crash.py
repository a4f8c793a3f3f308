"""The test that matters: SIGKILL a trainer anywhere, resume it, and get the same model.

A trainer subprocess reads a single-partition topic of 20,000 ``sample-784``-like records (plus an
int64 sample id), packed 64 per message and cut into batches of 100 (so batches end inside
messages). It is killed with SIGKILL at 10 seeded moments — between steps, and paused inside each
phase of the checkpoint protocol — and resumed each time. Its final weights and optimizer state
must be bitwise equal to those of a run never killed, and the audit of trained sample ids (kept
inside each checkpoint, so it is exactly as durable as the model) must hold every id exactly once,
in the same order as the clean run.

The trainers are real processes killed with SIGKILL. Starting Python and importing torch costs
about 5 s of a loaded 2-core machine, 12 times over; so one process started with
``tests.support.spawn_python`` (``python -m tests.integration.test_training_crash runs PLAN.json``)
imports once and forks each trainer run in turn, printing ``pid N`` before and ``exit N CODE``
after each. ``... worker ARGS`` runs one trainer directly.

Every line goes out in one ``write(2)`` (``tests.support.say``), and the test reads a packet-mode
pipe that refuses any other write: ``print`` writes the newline apart, so a trainer killed between
the two would leave half a line for the ``exit`` line after it to be glued onto.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import torch

from infeed.codecs import Field, RecordBatch, Schema
from infeed.streams import Producer
from infeed.training import ModelRegistry, QueueDataset, Trainer
from infeed.training.models import mlp
from tests.support import broker_url, line_pipe, read_lines, say, spawn_python

SAMPLES = 20_000
PER_MESSAGE = 64
BATCH = 100
CHECKPOINT_EVERY = 7
KILLS = 10
SEED = 784
STEPS = SAMPLES // BATCH
SCHEMA = Schema({"x": Field("float32", (784,)), "y": Field("int64"), "id": Field("int64")})
#: Where the worker can be held so the test kills it there.
PHASES = (
    "begin",
    "wrote:model.safetensors",
    "wrote:dataset.json",
    "written",
    "renamed",
    "latest",
    "committed",
    "announced",
)
FACTORY = "tests.integration.test_training_crash:make_model"


def make_model() -> torch.nn.Module:
    """A small MLP, so the test stays quick; seeded so every run starts from the same weights."""
    torch.manual_seed(0)
    return mlp(784, (32,), 10)


# -- the worker -----------------------------------------------------------------------------------


def _deterministic() -> None:
    # The documented twin of torch.use_deterministic_algorithms(True), which also imports
    # torch._inductor to set its flag there: 4 s per process on these machines.
    torch.set_deterministic_debug_mode("error")
    torch.set_num_threads(1)


def runs(plan_file: str) -> int:
    """Fork one worker per entry of the JSON list of argument lists in ``plan_file``, in turn."""
    _deterministic()
    # Import what the first optimizer step imports lazily (torch._dynamo, sympy: 2 s) once, here.
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.autograd.backward(model(torch.zeros(1, 784)).sum())
    optimizer.step()
    plan = json.loads(Path(plan_file).read_text())
    for argv in plan:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the trainer
            code = 1
            try:
                code = worker(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
    return 0


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--registry")
    parser.add_argument("--events-topic")
    parser.add_argument("--pause-at")
    parser.add_argument("--pause-from-step", type=int, default=0)
    args = parser.parse_args(argv)
    # The documented twin of torch.use_deterministic_algorithms(True), which also imports
    # torch._inductor to set its flag there: 4 s per process on these machines, 12 processes here.
    _deterministic()
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def on_phase(phase: str, step: int) -> None:
        say(f"phase {phase} {step}")
        if phase == args.pause_at and step >= args.pause_from_step:
            say("paused")
            time.sleep(3600)

    with QueueDataset(
        args.broker, args.topic, group=args.group, schema=SCHEMA, batch_size=BATCH, epochs=1
    ) as ds:
        trainer = Trainer(
            model,
            optimizer,
            torch.nn.functional.cross_entropy,
            ds,
            checkpoint_dir=args.checkpoints,
            checkpoint_every_steps=CHECKPOINT_EVERY,
            audit_field="id",
            registry=ModelRegistry(args.registry) if args.registry else None,
            model_name="crash" if args.registry else None,
            model_factory=FACTORY if args.registry else None,
            events_topic=args.events_topic,
            on_step=lambda info: say(f"step {info.step}"),
            on_checkpoint_phase=on_phase,
        )
        say(f"resumed {trainer.restore()}")
        result = trainer.fit()
    say(f"done {result.steps} {result.samples}")
    return 0


# -- the test -------------------------------------------------------------------------------------


def _real(name: str, module: str, query: str = "") -> Callable[[Path], str] | None:
    if importlib.util.find_spec(module) is None:
        return None

    def make(tmp: Path) -> str:
        url = broker_url(name)
        extra = f"{query}&" if query else ""
        return f"{url}{'&' if '?' in url else '?'}{extra}{urlencode({'ack_timeout_s': 5})}"

    return make


#: Backends the crash test runs on: sqlite always; a real backend joins when its module exists
#: (it must declare REPLAY and SEEK, which the dataset checks). Add one here to run it.
BACKENDS: dict[str, Callable[[Path], str]] = {"sqlite": lambda tmp: f"sqlite:///{tmp}/crash.db"}
for _name, _broker, _module, _query in (
    ("redis", "redis", "infeed.brokers.redis", ""),
    ("nats", "nats", "infeed.brokers.nats", ""),
    ("kafka", "kafka", "infeed.brokers.kafka", ""),
    ("amqp-stream", "rabbitmq", "infeed.brokers.rabbitmq", "queue_type=stream"),
):
    _make = _real(_broker, _module, _query)
    if _make is not None:
        BACKENDS[_name] = _make


def _pulsar(tmp: Path) -> str:
    """Pulsar needs its admin API (web service) besides the binary protocol's URL."""
    query = {"admin_url": broker_url("pulsar", "admin"), "ack_timeout_s": 5}
    return f"{broker_url('pulsar')}?{urlencode(query)}"


if importlib.util.find_spec("infeed.brokers.pulsar") is not None:
    BACKENDS["pulsar"] = _pulsar


def _proc_state(pid: int) -> str:
    """The state and kernel wait channel of each thread of ``pid`` (Linux ``/proc``), or why not."""
    out = []
    try:
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text() if (task / "wchan").exists() else "?"
            out.append(f"{task.name}:{state}:{wchan}")
    except OSError as exc:
        return f"unreadable ({exc})"
    return " ".join(out) or "no threads"


class _Runs:
    """The process that forks the trainer runs; its stdout lines are read by a thread."""

    def __init__(self, plan: Path) -> None:
        # A packet-mode pipe: each write is read apart, and one that is not a whole line fails.
        read_fd, write_fd = line_pipe()
        try:
            # Its own session, so close() can kill a trainer it forked too (which holds the pipe open).
            self.proc = spawn_python(
                "-m",
                "tests.integration.test_training_crash",
                "runs",
                str(plan),
                stdout=write_fd,
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors = ""
        self.broken = ""
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        try:
            for line in read_lines(fd):
                self.lines.put(line)
        except ValueError as exc:
            self.broken = str(exc)
        self.lines.put(None)

    def wait_for(self, accept: Callable[[str], bool], deadline: float) -> str:
        """Return the first line ``accept`` takes."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"runs stalled; last lines: {self.seen[-8:]}") from None
            if line is None:
                raise AssertionError(
                    f"runs ended early; {self.broken or 'last lines'}: {self.seen[-8:]}\n{self.stderr()}"
                )
            self.seen.append(line)
            if accept(line):
                return line

    def stderr(self) -> str:
        self.close()
        return self.errors

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            with self.proc.stderr:
                self.errors = self.proc.stderr.read()[-4000:]


def _produce(url: str, topic: str) -> None:
    from infeed.brokers import connect

    rng = np.random.default_rng(SEED)
    batch = RecordBatch(
        {
            "x": rng.random((SAMPLES, 784), dtype=np.float32),
            "y": rng.integers(0, 10, SAMPLES, dtype=np.int64),
            "id": np.arange(SAMPLES, dtype=np.int64),
        }
    )
    with connect(url) as broker:
        broker.create_topic(topic, partitions=1)
        with Producer(broker, topic, records_per_message=PER_MESSAGE, messages_per_publish=50) as producer:
            producer.send_batch(batch)


def _plan(rng: random.Random) -> list[tuple[int, str]]:
    """Ten (step, where) kill moments: 'step' kills a little after that step, a phase pauses there."""
    steps = sorted(rng.sample(range(4, STEPS - 4, 12), KILLS))
    wheres = ["step", "step", "step", *PHASES[: KILLS - 3]]
    rng.shuffle(wheres)
    return list(zip(steps, wheres, strict=True))


def _either(moment: Callable[[str], bool], prefix: str) -> Callable[[str], bool]:
    """Accept the lines ``moment`` accepts, and those starting with ``prefix``."""
    return lambda line: moment(line) or line.startswith(prefix)


def _step_at_least(step: int) -> Callable[[str], bool]:
    return lambda line: line.startswith("step ") and int(line.split()[1]) >= step


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _latest(checkpoints: Path) -> Path:
    return checkpoints / (checkpoints / "LATEST").read_text().strip()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~1 min idle; a loaded 2-core machine can take several times that
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sigkill_anywhere_then_resume_trains_every_sample_exactly_once(backend: str, tmp_path: Path) -> None:
    url = BACKENDS[backend](tmp_path)
    topic = f"crash-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    _produce(url, topic)
    clean, crashed, registry_dir = tmp_path / "clean", tmp_path / "crashed", tmp_path / "registry"
    common = ["--broker", url, "--topic", topic, "--group", "crashed", "--checkpoints", str(crashed)]
    common += ["--registry", str(registry_dir), "--events-topic", f"{topic}.events"]
    rng = random.Random(SEED)
    kills = _plan(rng)
    plan = [["--broker", url, "--topic", topic, "--group", "clean", "--checkpoints", str(clean)]]
    for step, where in kills:
        plan.append(
            common if where == "step" else [*common, "--pause-at", where, "--pause-from-step", str(step)]
        )
    plan.append(common)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))

    runs = _Runs(plan_file)
    deadline = time.monotonic() + 570
    try:
        runs.wait_for(lambda line: line.startswith("pid "), deadline)
        runs.wait_for(lambda line: line.startswith("exit "), deadline)
        assert runs.seen[-1].endswith(" 0") and f"done {STEPS} {SAMPLES}" in runs.seen, runs.seen[-5:]
        where_killed: list[str] = []
        ended_first: list[str] = []
        for step, where in kills:
            pid = int(runs.wait_for(lambda line: line.startswith("pid "), deadline).split()[1])
            exit_line = f"exit {pid} "
            moment = _step_at_least(step) if where == "step" else "paused".__eq__
            line = runs.wait_for(_either(moment, exit_line), deadline)
            if line.startswith(exit_line):
                # The run finished before its moment came: an earlier kill landed late, after the last
                # checkpoint, and nothing was left to train. Never kill a pid that ended.
                assert line == f"{exit_line}0", runs.seen[-5:]
                ended_first.append(f"{where}@{step}")
                continue
            if where == "step":
                time.sleep(rng.uniform(0, 0.03))  # lands anywhere: in a step, or in a checkpoint write
            os.kill(pid, signal.SIGKILL)
            last_phase = next((line for line in reversed(runs.seen) if line.startswith("phase")), "")
            where_killed.append(f"{where}@{step} ({runs.seen[-1]}; {last_phase})")
            try:
                exited = runs.wait_for(_either(lambda line: False, exit_line), deadline)
            except AssertionError as exc:  # what the killed process is stuck on, for whoever reads this
                raise AssertionError(f"{exc}\nkilled process {pid}: {_proc_state(pid)}") from None
            assert exited == f"exit {pid} -9"
        runs.wait_for(lambda line: line.startswith("exit "), deadline)
        assert runs.seen[-1].endswith(" 0"), runs.seen[-5:]
    finally:
        runs.close()
    resumed = [line for line in runs.seen if line.startswith("resumed")]
    print(
        f"{backend}: {len(where_killed)} kills: {where_killed}; ended first: {ended_first}; "
        f"resumed: {resumed}"
    )
    assert len(where_killed) >= KILLS - 2, f"only {len(where_killed)} of {KILLS} kills landed"
    assert runs.seen.count(f"done {STEPS} {SAMPLES}") == 2
    assert len(resumed) == KILLS + 2 and sum(line != "resumed None" for line in resumed) >= KILLS - 1

    # The model: bitwise the same weights and optimizer state as the run never killed.
    want, got = _latest(clean), _latest(crashed)
    assert want.name == got.name == f"step-{STEPS:010d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = _tensors(want / name), _tensors(got / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"

    # The audit: every sample id trained exactly once, in the clean run's order.
    ids = _tensors(got / "audit.safetensors")["values"].numpy()
    assert len(ids) == SAMPLES
    assert np.array_equal(np.sort(ids), np.arange(SAMPLES))
    assert np.array_equal(ids, _tensors(want / "audit.safetensors")["values"].numpy())

    # The published version: the final weights, loadable by the inference side.
    registry = ModelRegistry(registry_dir)
    latest = registry.latest("crash")
    assert latest is not None and latest.version == STEPS and latest.samples == SAMPLES
    final = _tensors(got / "model.safetensors")
    for key, value in registry.load("crash").state_dict().items():
        assert torch.equal(value, final[key])


@pytest.mark.timeout(120)
def test_a_queue_without_seek_refuses_exact_resume_naming_the_capability(tmp_path: Path) -> None:
    """RabbitMQ's queue model (classic queues) has no SEEK, REPLAY or OFFSET_COMMIT.

    Its positions are publish stamps, which need not grow with the queue's order, so no checkpoint
    could tell records trained before it from records not read yet: the dataset refuses, by name.
    """
    pytest.importorskip("pika")
    url = f"{broker_url('rabbitmq')}?queue_type=classic&ack_timeout_s=5"
    topic = f"crash-queue-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    from infeed.brokers import connect

    with connect(url) as broker:
        broker.create_topic(topic, partitions=1)
        broker.subscribe(topic, group="g").close()  # a queue routes only to groups that exist
        with Producer(broker, topic, records_per_message=PER_MESSAGE) as producer:
            producer.send_batch(
                RecordBatch(
                    {
                        "x": np.zeros((4 * BATCH, 784), np.float32),
                        "y": np.zeros(4 * BATCH, np.int64),
                        "id": np.arange(4 * BATCH, dtype=np.int64),
                    }
                )
            )
        with pytest.raises(ValueError, match="replay and seek"):
            QueueDataset(broker, topic, group="g", schema=SCHEMA, batch_size=BATCH, epochs=1)
        with QueueDataset(broker, topic, group="g", schema=SCHEMA, batch_size=BATCH, idle_timeout_s=2) as ds:
            model = make_model()
            with pytest.raises(
                ValueError, match=r"needs a broker with the SEEK capability.*queue_type=stream"
            ):
                Trainer(
                    model,
                    torch.optim.Adam(model.parameters(), lr=1e-3),
                    torch.nn.functional.cross_entropy,
                    ds,
                    checkpoint_dir=tmp_path / "ckpt",
                    checkpoint_every_steps=1,
                    events_topic=None,
                )
        assert not (tmp_path / "ckpt" / "LATEST").exists()
        broker.delete_topic(topic)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker(sys.argv[2:]))
    if sys.argv[1:2] == ["runs"] and len(sys.argv) == 3:
        sys.exit(runs(sys.argv[2]))
    sys.exit("usage: python -m tests.integration.test_training_crash worker ARGS | runs PLAN.json")
