"""SIGKILL a real ``infeed score`` process mid-stream, again and again: every input scored once.

The input topic has two partitions of single-record messages and record batches (600 records).
``infeed score`` runs as a real process; the test kills it with SIGKILL each time the output has
grown past the next mark (so the kills land wherever the process happens to be: computing,
publishing, acking, committing), starts it again, and finally lets it run until it is idle. The
output topic must then hold every input record exactly once, with the probe's outputs and the
input's position. Leases time out after 1 s, so the messages a killed process held come back and
must be skipped, not scored again. Runs on sqlite://, a real Redis and a real Kafka.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from infeed.brokers import Broker, connect
from infeed.codecs import MsgpackCodec, RecordBatch, decode_message, default_registry, encode_message
from infeed.errors import TopicNotFoundError
from infeed.inference import ModelRegistry
from tests.inference_models import publish_probe
from tests.support import ROOT, broker_url, child_env

SINGLES = 200
BATCHES = 40
PER_BATCH = 10
RECORDS = SINGLES + BATCHES * PER_BATCH
MESSAGES = SINGLES + BATCHES
#: Output depths (messages) after which the running scorer is killed.
KILL_MARKS = (30, 80, 130, 180)
SCALE = 2.0
CODEC = MsgpackCodec()


def _produce(broker: Broker, topic: str) -> None:
    broker.create_topic(topic, partitions=2)
    next_id = 0
    for i in range(MESSAGES):  # every sixth message a record batch: 200 singles, 40 batches
        n = PER_BATCH if i % 6 == 5 else 1
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        x = np.repeat(ids.astype(np.float32)[:, None], 4, axis=1)
        if n == 1:
            broker.publish(topic, CODEC.encode({"id": int(ids[0]), "x": x[0]}), key=f"k{i % 7}")
        else:
            payload, headers = encode_message(CODEC, RecordBatch({"id": ids, "x": x}))
            broker.publish(topic, payload, key=f"k{i % 7}", headers=headers)
        next_id += n
    assert next_id == RECORDS


def _output_depth(broker: Broker, topic: str) -> int:
    try:
        return broker.describe_topic(topic).depth
    except TopicNotFoundError:
        return 0


def _start(url: str, in_topic: str, out_topic: str, registry: Path) -> subprocess.Popen[bytes]:
    args = [
        "score",
        "--in",
        in_topic,
        "--out",
        out_topic,
        "--model",
        "probe",
        "--registry-dir",
        str(registry),
    ]
    args += [
        "--id-field",
        "id",
        "--max-batch-size",
        "8",
        "--max-wait-ms",
        "1",
        "--no-follow",
        "--idle-exit-s",
        "3",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "infeed", "--broker", url, *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _read_scores(broker: Broker, topic: str) -> list[dict[str, object]]:
    consumer = broker.subscribe(topic, group=f"check-{uuid.uuid4().hex}", start="earliest")
    out: list[dict[str, object]] = []
    try:
        while got := consumer.receive(max_messages=500, timeout_s=1.0):
            for d in got:
                batch = decode_message(d.payload, d.headers, default_registry())
                out += [batch.record(i) for i in range(len(batch))]
            consumer.ack(got)
    finally:
        consumer.close()
    return out


@pytest.mark.parametrize("backend", ["sqlite", "redis", "kafka"])
def test_sigkill_mid_stream_scores_every_record_once(backend: str, tmp_path: Path) -> None:
    base = f"sqlite:///{tmp_path}/q.db" if backend == "sqlite" else broker_url(backend)
    url = base + ("&" if "?" in base else "?") + "ack_timeout_s=1"
    run = uuid.uuid4().hex[:8]
    in_topic, out_topic = f"score-in-{run}", f"score-out-{run}"
    publish_probe(ModelRegistry(tmp_path / "reg"), "probe", 1, SCALE, sleep_s=0.005)
    with connect(url) as broker:
        _produce(broker, in_topic)
        kills = 0
        for mark in KILL_MARKS:
            process = _start(url, in_topic, out_topic, tmp_path / "reg")
            deadline = time.monotonic() + 120
            while _output_depth(broker, out_topic) < mark:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    _, stderr = process.communicate()
                    pytest.fail(f"scorer ended before output reached {mark}: {stderr.decode()[-2000:]}")
                # No sleep: the kill should land right after a publish, before the ack, as
                # often as it can (a window of about a millisecond).
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
        final = _start(url, in_topic, out_topic, tmp_path / "reg")
        _, stderr = final.communicate(timeout=180)
        assert final.returncode == 0, stderr.decode()[-2000:]
        scores = _read_scores(broker, out_topic)
        broker.delete_topic(in_topic)
        broker.delete_topic(out_topic)
    assert kills == len(KILL_MARKS)
    counts = Counter(int(s["id"]) for s in scores)  # type: ignore[call-overload]
    assert sorted(counts) == list(range(RECORDS)), "records lost"
    assert max(counts.values()) == 1, f"scored twice: {[i for i, n in counts.items() if n > 1][:20]}"
    for s in scores:
        expected = np.full(4, SCALE * int(s["id"]), np.float32)  # type: ignore[call-overload]
        np.testing.assert_array_equal(s["output"], expected)
        assert s["model_version"] == 1 and str(s["input"]).startswith(f"{in_topic}:")
