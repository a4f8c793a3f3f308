"""Training in a group of ranks started by ``torchrun`` (gloo on CPU): exactly once, elastic, learning.

A topic of 4,000 small records (``x`` float32 (16,), ``y`` int64 from a fixed linear rule, ``id``
int64) in 4 partitions, 20 records per message, is trained by real ``torchrun`` jobs of real
processes, on SQLite, Kafka and Redis. Every check reads the group checkpoint's audit (the ``id``
and step of every record trained into the model, kept as durably as the model): every id exactly
once.

* two ranks through ``python -m infeed train`` (the CLI), then the held-out loss against one
  process trained on the same records;
* SIGKILL of one rank mid-run: torchrun (``--max-restarts``) restarts the group, which resumes from
  the group checkpoint;
* world size 2 → 1 → 2 across three jobs (each stops after some samples), re-mapping partitions;
* uneven shares (3 partitions, 2 ranks): no hang, one rank steps empty while the other trains on.

``python -m tests.integration.test_training_distributed worker ARGS`` is the rank the kill and
elastic tests run (the CLI's wiring plus a slower step, so a kill lands mid-run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infeed.codecs import Field, RecordBatch, Schema
from infeed.streams import Producer
from tests.support import ROOT, broker_url, child_env

SAMPLES = 4_000
HELD_OUT = 1_000
FEATURES = 16
CLASSES = 4
PARTITIONS = 4
PER_MESSAGE = 20
BATCH = 50
SCHEMA = Schema({"x": Field("float32", (FEATURES,)), "y": Field("int64"), "id": Field("int64")})
MODEL_KWARGS = {"in_features": FEATURES, "hidden": [32], "out_features": CLASSES}


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rule = np.random.default_rng(7).standard_normal((FEATURES, CLASSES)).astype(np.float32)
    x = rng.standard_normal((n, FEATURES), dtype=np.float32)
    return {"x": x, "y": np.argmax(x @ rule, axis=1).astype(np.int64), "id": np.arange(n, dtype=np.int64)}


def _produce(url: str, topic: str, partitions: int = PARTITIONS) -> None:
    from infeed.brokers import connect

    with connect(url) as broker:
        broker.create_topic(topic, partitions=partitions)
        with Producer(broker, topic, records_per_message=PER_MESSAGE, messages_per_publish=50) as producer:
            producer.send_batch(RecordBatch(_data(SAMPLES, 0)))  # keyless: spread over the partitions


# -- the rank the kill and elastic tests run ------------------------------------------------------


def _say(line: str) -> None:
    # One write per line: ranks share torchrun's stdout, and print() writes the newline apart.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker(argv: list[str]) -> int:
    from infeed.training import QueueDataset, StepInfo, Trainer
    from infeed.training.distributed import DistContext, assign_partitions
    from infeed.training.models import mlp

    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ctx = DistContext.from_env()
    assert ctx is not None, "run me under torchrun"
    torch.manual_seed(0)
    model = mlp(**MODEL_KWARGS)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def on_step(info: StepInfo) -> None:
        _say(f"rank {ctx.rank} step {info.step}")
        time.sleep(args.step_sleep_s)  # a slower step, so a kill lands mid-run

    with QueueDataset(args.broker, args.topic, group="dist", schema=SCHEMA, batch_size=BATCH, epochs=1) as ds:
        n_partitions = len(ds.broker.describe_topic(args.topic).partitions)
        ds.partitions = assign_partitions(n_partitions, ctx.rank, ctx.world_size)
        trainer = Trainer(
            model,
            optimizer,
            torch.nn.functional.cross_entropy,
            ds,
            checkpoint_dir=args.checkpoints,
            checkpoint_every_steps=3,
            max_samples=args.max_samples,
            audit_field="id",
            distributed=ctx,
            progress_topic=f"{args.topic}.progress",
            on_step=on_step,
        )
        _say(f"rank {ctx.rank} of {ctx.world_size} resumed {trainer.restore()}")
        result = trainer.fit()
    _say(f"rank {ctx.rank} done {result.steps} {result.samples}")
    ctx.close()
    return 0


# -- helpers --------------------------------------------------------------------------------------


def _torchrun(nproc: int, target: list[str], *, restarts: int = 0) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [f"--max-restarts={restarts}", "--monitor-interval=0.2", *target]
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        command,
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL torchrun's ranks (each in a session of its own), then torchrun."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout_s} s:\n{output[-3000:]}") from None
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{output[-3000:]}"
    return output


def _latest(checkpoints: Path) -> Path:
    return checkpoints / (checkpoints / "LATEST").read_text().strip()


def _audit_exactly_once(checkpoints: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    latest = _latest(checkpoints)
    audit = load_file(str(latest / "audit.safetensors"))
    ids, steps = audit["values"], audit["steps"]
    assert len(ids) == SAMPLES, f"{len(ids)} records trained, want {SAMPLES}"
    assert np.array_equal(np.sort(ids), np.arange(SAMPLES)), "some ids trained twice, some never"
    meta = json.loads((latest / "trainer.json").read_text())
    assert meta["samples"] == SAMPLES
    assert steps.min() >= 1 and steps.max() == meta["step"]
    return ids, steps


def _held_out_loss(model: torch.nn.Module) -> float:
    data = _data(HELD_OUT, 1)
    with torch.no_grad():
        out = model(torch.from_numpy(data["x"]))
        return float(torch.nn.functional.cross_entropy(out, torch.from_numpy(data["y"])))


def _single_process_loss(url: str, topic: str, tmp: Path) -> float:
    from infeed.training import QueueDataset, Trainer
    from infeed.training.models import mlp

    torch.manual_seed(0)
    model = mlp(**MODEL_KWARGS)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with QueueDataset(url, topic, group="single", schema=SCHEMA, batch_size=2 * BATCH, epochs=1) as ds:
        Trainer(model, optimizer, torch.nn.functional.cross_entropy, ds, checkpoint_dir=tmp / "single").fit()
    return _held_out_loss(model)


def _sqlite(tmp: Path) -> str:
    return f"sqlite:///{tmp}/dist.db"


def _kafka(tmp: Path) -> str:
    return broker_url("kafka")


def _redis(tmp: Path) -> str:
    return broker_url("redis")


BACKENDS: dict[str, Callable[[Path], str]] = {"sqlite": _sqlite, "kafka": _kafka, "redis": _redis}


def _topic() -> str:
    return f"dist-{os.getpid()}-{int(time.time() * 1000) % 10**8}"


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_ranks_through_the_cli_train_every_sample_once_and_learn(backend: str, tmp_path: Path) -> None:
    url, topic = BACKENDS[backend](tmp_path), _topic()
    _produce(url, topic)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA.to_dict()))
    checkpoints = tmp_path / "ckpt"
    cli = ["-m", "infeed", "train", "--broker", url, "--topic", topic, "--schema", str(schema_file)]
    cli += ["--model", "infeed.training.models:mlp", "--model-kwargs", json.dumps(MODEL_KWARGS)]
    cli += ["--checkpoint-dir", str(checkpoints), "--epochs", "1", "--batch-size", str(BATCH)]
    cli += ["--checkpoint-every-steps", "5", "--threads", "1", "--lr", "1e-2", "--audit-field", "id"]
    cli += ["--progress-topic", f"{topic}.progress", "--group", "cli"]
    output = _finish(_torchrun(2, cli), 120)
    assert "rank 0 of 2" in output, output[-2000:]
    _, steps = _audit_exactly_once(checkpoints)
    # Each step trained at most one batch per rank.
    assert np.bincount(steps).max() <= 2 * BATCH

    from safetensors.torch import load_model

    from infeed.training.models import mlp

    distributed = mlp(**MODEL_KWARGS)  # type: ignore[arg-type]
    load_model(distributed, str(_latest(checkpoints) / "model.safetensors"))
    torch.manual_seed(0)
    untrained = _held_out_loss(mlp(**MODEL_KWARGS))  # type: ignore[arg-type]
    single = _single_process_loss(url, topic, tmp_path)
    two = _held_out_loss(distributed)
    print(
        f"{backend}: held-out loss untrained {untrained:.3f}, one process {single:.3f}, two ranks {two:.3f}"
    )
    assert two < 0.7 * untrained and two < 1.3 * single + 0.05

    # The progress events: one per checkpoint, naming both ranks' partitions.
    from infeed.brokers import connect

    with connect(url) as broker:
        consumer = broker.subscribe(f"{topic}.progress", group="follower")
        events: list[dict[str, Any]] = []
        while not events or events[-1]["samples"] < SAMPLES:
            got = consumer.receive(max_messages=100, timeout_s=5.0)
            assert got, f"progress events stopped at {events[-1:]}"
            events += [json.loads(d.payload) for d in got]
        consumer.close()
    last = events[-1]
    assert last["world_size"] == 2 and [r["rank"] for r in last["ranks"]] == [0, 1]
    assert sorted(p for r in last["ranks"] for p in r["positions"]) == [str(p) for p in range(PARTITIONS)]


def _worker(url: str, topic: str, checkpoints: Path, *extra: str) -> list[str]:
    return ["-m", "tests.integration.test_training_distributed", "worker", "--broker", url, "--topic", topic,
            "--checkpoints", str(checkpoints), *extra]  # fmt: skip


def _read_lines(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            lines.put(line.rstrip())
    lines.put(None)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sigkill_one_rank_then_torchrun_restarts_and_the_audit_stays_exact(
    backend: str, tmp_path: Path
) -> None:
    url, topic = BACKENDS[backend](tmp_path), _topic()
    _produce(url, topic)
    checkpoints = tmp_path / "ckpt"
    proc = _torchrun(2, _worker(url, topic, checkpoints, "--step-sleep-s", "0.05"), restarts=2)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    killed = None
    deadline = time.monotonic() + 110
    try:
        while True:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                break
            seen.append(line)
            if killed is None and "rank 1 step 12" in line:
                ranks = [
                    p for p in _children(proc.pid) if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes()
                ]
                killed = max(ranks)
                os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=max(0.01, deadline - time.monotonic()))
    except (queue.Empty, subprocess.TimeoutExpired):
        pass
    finally:
        if proc.poll() is None:
            _kill(proc)
            proc.wait()
        reader.join()
    text = "\n".join(seen)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{text[-3000:]}"
    assert killed is not None, text[-3000:]
    resumed = [line for line in seen if " resumed " in line]
    assert sorted(re.findall(r"rank (\d) done \d+ 4000", text)) == ["0", "1"], text[-3000:]
    assert any("resumed None" not in line for line in resumed), text[-3000:]
    _audit_exactly_once(checkpoints)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_world_size_two_then_one_then_two_keeps_the_audit_exact(backend: str, tmp_path: Path) -> None:
    url, topic = BACKENDS[backend](tmp_path), _topic()
    _produce(url, topic)
    checkpoints = tmp_path / "ckpt"
    for nproc, extra in ((2, ["--max-samples", "1300"]), (1, ["--max-samples", "2600"]), (2, [])):
        output = _finish(_torchrun(nproc, _worker(url, topic, checkpoints, *extra)), 60)
        assert f"rank 0 of {nproc}" in output, output[-2000:]
    meta = json.loads((_latest(checkpoints) / "trainer.json").read_text())
    assert meta["world_size"] == 2
    _audit_exactly_once(checkpoints)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_uneven_shares_do_not_hang_and_the_audit_stays_exact(tmp_path: Path) -> None:
    # 3 partitions for 2 ranks: rank 0 reads twice what rank 1 reads, and steps on alone at the end.
    url, topic = _sqlite(tmp_path), _topic()
    _produce(url, topic, partitions=3)
    checkpoints = tmp_path / "ckpt"
    output = _finish(_torchrun(2, _worker(url, topic, checkpoints)), 90)
    assert sorted(re.findall(r"rank (\d) done \d+ 4000", output)) == ["0", "1"], output[-2000:]
    _, steps = _audit_exactly_once(checkpoints)
    per_step = np.bincount(steps)[1:]
    assert per_step.max() <= 2 * BATCH
    # Rank 1 ran out first: from then on rank 0 stepped with one batch while rank 1 stepped empty.
    assert (per_step == BATCH).sum() >= 10, per_step.tolist()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit("usage: python -m tests.integration.test_training_distributed worker ARGS")
