"""QueueDataset's feed process: the same batches and resume as the thread, and it dies with us."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from infeed.brokers import connect
from infeed.brokers.base import Message
from infeed.brokers.memory import MemoryBroker
from infeed.codecs import Field, MsgpackCodec, Schema, encode_message
from infeed.errors import BrokerConnectionError
from infeed.streams import Producer
from infeed.training import QueueDataset
from infeed.training._feed import FeedProcessError, rebuild_error
from tests.unit.test_training_dataset import flat, ids_of, records

SCHEMA = Schema({"x": Field("float32", (3,)), "id": Field("int64")})


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'q.db'}"


def fill(url: str, n: int, per_message: int, start: int = 0) -> None:
    with connect(url) as broker, Producer(broker, "t", records_per_message=per_message) as producer:
        producer.send_batch(records(start, start + n))


def dataset(url: str, **options: Any) -> QueueDataset:
    settings: dict[str, Any] = {"group": "g", "schema": SCHEMA, "batch_size": 10, "epochs": 1}
    settings.update(options)
    return QueueDataset(url, "t", **settings)


def ids(ds: QueueDataset, limit: int | None = None) -> list[list[int]]:
    return ids_of(iter(ds), limit)


@pytest.mark.parametrize("per_message", [1, 7, 64])
def test_the_feed_process_yields_the_same_batches_as_the_thread(url: str, per_message: int) -> None:
    fill(url, 205, per_message)
    with dataset(url, group="p") as ds:
        assert ds.feed == "process"
        by_process = ids(ds)
    with dataset(url, group="t", feed="thread") as ds:
        by_thread = ids(ds)
    assert by_process == by_thread
    assert flat(by_process) == list(range(205)) and [len(b) for b in by_process][-1] == 5


@pytest.mark.parametrize(("per_message", "shuffle"), [(1, 0), (7, 0), (7, 25)])
def test_a_state_taken_mid_message_resumes_exactly(url: str, per_message: int, shuffle: int) -> None:
    fill(url, 120, per_message)
    with dataset(url, shuffle_buffer=shuffle, group="whole") as ds:
        whole = ids(ds)
    with dataset(url, shuffle_buffer=shuffle) as ds:
        head = ids(ds, limit=3)
        state = ds.state_dict()
        ds.commit(state)
    with dataset(url, shuffle_buffer=shuffle) as ds:
        ds.load_state_dict(state)
        tail = ids(ds)
    assert head + tail == whole


def test_a_commit_moves_the_group_and_a_new_dataset_starts_there(url: str) -> None:
    fill(url, 60, 4)
    with dataset(url) as ds:
        ids(ds, limit=2)
        state = ds.state_dict()
        ds.commit(state)
    with dataset(url) as ds:  # no state loaded: the committed position is where reading resumes
        assert flat(ids(ds))[0] == 20


def test_epochs_poison_and_idle(url: str) -> None:
    fill(url, 30, 8)
    with connect(url) as broker:
        payload, headers = encode_message(MsgpackCodec(), records(30, 35))
        broker.publish_many("t", [Message(b"\x00not msgpack"), Message(payload, headers=headers)])
    with dataset(url, epochs=2) as ds:
        got = flat(ids(ds))
        assert ds.dead_lettered == 2  # counted once per epoch it was read
    assert got == list(range(35)) * 2 and ds.epoch == 2
    with dataset(url, group="idle", epochs=None, idle_timeout_s=0.3) as ds:
        assert flat(ids(ds)) == list(range(35))
        fill(url, 15, 5, start=35)
        assert flat(ids(ds)) == list(range(35, 50))  # the same feed process reads on
        assert ds.lag() == 0


def test_a_killed_feed_process_fails_the_iteration_instead_of_hanging(url: str) -> None:
    fill(url, 50, 1)
    with dataset(url, epochs=None) as ds:
        batches = iter(ds)
        next(batches)
        assert ds._remote is not None
        os.kill(ds._remote._proc.pid, signal.SIGKILL)
        with pytest.raises(FeedProcessError, match="exited"):
            for _ in batches:
                pass


_TRAINER = textwrap.dedent(
    """
    import os, sys, time
    from infeed.codecs import Field, Schema
    from infeed.training import QueueDataset
    schema = Schema({"x": Field("float32", (3,)), "id": Field("int64")})
    ds = QueueDataset(sys.argv[1], "t", group="g", schema=schema, batch_size=10)
    next(iter(ds))
    holder = 0
    if sys.argv[2] == "fork":  # a process forked from the trainer keeps the feed's pipes open
        holder = os.fork()
        if holder == 0:
            time.sleep(120)
            os._exit(0)
    print(ds._remote._proc.pid, holder, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("fork", ["alone", "fork"])
def test_the_feed_process_ends_when_the_training_process_is_killed(url: str, fork: str) -> None:
    fill(url, 50, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, url, fork], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert trainer.stdin is not None and trainer.stdout is not None
    with trainer.stdin, trainer.stdout:
        feed_pid, holder = map(int, trainer.stdout.readline().split())
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{feed_pid}").exists() and _state(feed_pid) != "Z":
            assert time.monotonic() < deadline, "the feed process outlived its training process"
            time.sleep(0.05)
    finally:
        if holder:
            os.kill(holder, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_where_the_feed_cannot_be_a_process_it_is_a_thread_or_refused(url: str) -> None:
    broker = MemoryBroker()
    with QueueDataset(broker, "t", group="g", schema=SCHEMA, batch_size=4) as ds:
        assert ds.feed == "thread"
    with pytest.raises(ValueError, match="MULTI_PROCESS"):
        QueueDataset(broker, "t", group="g", schema=SCHEMA, batch_size=4, feed="process")
    with connect(url) as built, pytest.raises(ValueError, match="not opened from a URL"):
        built.url = None  # as if built directly, not by connect()
        QueueDataset(built, "t", group="g", schema=SCHEMA, batch_size=4, feed="process")
    with pytest.raises(ValueError, match="feed must be one of"):
        QueueDataset(url, "t", group="g", schema=SCHEMA, batch_size=4, feed="fork")
    with connect(url) as direct, QueueDataset(direct, "t", group="g", schema=SCHEMA, batch_size=4) as ds:
        assert ds.feed == "process"  # connect() records the URL another process needs


def test_errors_of_the_feed_process_come_back_as_their_own_class() -> None:
    error = rebuild_error({"type": "BrokerConnectionError", "message": "redis://h:1 refused", "trace": "..."})
    assert isinstance(error, BrokerConnectionError) and "redis://h:1 refused (in the feed process)" in str(
        error
    )
    assert isinstance(rebuild_error({"type": "ValueError", "message": "bad"}), ValueError)
    other = rebuild_error({"type": "WeirdClientError", "message": "boom", "trace": "Traceback: here"})
    assert isinstance(other, FeedProcessError) and "WeirdClientError: boom" in str(other)
    assert "Traceback: here" in str(other)
