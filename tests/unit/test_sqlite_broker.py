"""What is specific to the sqlite:// broker; shared behaviour is in tests/contract."""

from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from infeed.brokers import Consumer, Message, connect
from infeed.brokers._sqlite_db import ERROR_MAP, map_errors
from infeed.brokers.sqlite import SCHEMA_VERSION, SQLiteBroker, SQLiteConfig
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    BrokerTimeoutError,
    ConfigError,
    ConsumerClosedError,
    LeaseLostError,
    TopicNotFoundError,
)
from infeed.types import Capability, Delivery, Position
from tests.support import spawn_python
from tests.unit.error_mapping import raise_through


def open_db(path: Path, query: str = "") -> SQLiteBroker:
    return SQLiteBroker.from_url(f"sqlite:///{path}{'?' + query if query else ''}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
def broker(db: Path) -> Iterator[SQLiteBroker]:
    b = open_db(db)
    yield b
    b.close()


def drain(consumer: Consumer, count: int, *, timeout_s: float = 20.0) -> list[Delivery]:
    """Receive and ack ``count`` deliveries; fail if a receive waits ``timeout_s`` for nothing."""
    got: list[Delivery] = []
    while len(got) < count:
        batch = consumer.receive(max_messages=count - len(got), timeout_s=timeout_s)
        assert batch, f"received {len(got)} of {count} within {timeout_s}s"
        consumer.ack(batch)
        got.extend(batch)
    return got


# -- URL and options --------------------------------------------------------------------------


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        "sqlite:///rel.db": tmp_path / "rel.db",
        "sqlite:///./sub/dir/rel.db": tmp_path / "sub" / "dir" / "rel.db",
        f"sqlite:///{tmp_path}/abs/q.db": tmp_path / "abs" / "q.db",  # four slashes: absolute
        f"sqlite:///{tmp_path}/with%20space.db": tmp_path / "with space.db",
    }
    for url, path in cases.items():
        b = connect(url)
        assert isinstance(b, SQLiteBroker)
        assert isinstance(b.config, SQLiteConfig)
        assert b.config.path == str(path)
        assert path.is_file()
        b.close()
    assert cases[f"sqlite:///{tmp_path}/abs/q.db"].is_absolute()


def test_options_reach_the_config(db: Path) -> None:
    b = open_db(
        db,
        "synchronous=FULL&busy_timeout_s=2.5&ack_timeout_s=3&default_partitions=4"
        "&retention_max_messages=100&retention_max_age_s=60&poll_max_s=0.005",
    )
    cfg = b._cfg
    assert (cfg.synchronous, cfg.busy_timeout_s, cfg.ack_timeout_s, cfg.default_partitions) == (
        "FULL",
        2.5,
        3.0,
        4,
    )
    assert (cfg.retention_max_messages, cfg.retention_max_age_s, cfg.poll_max_s) == (100, 60.0, 0.005)
    b.publish("auto", b"x")
    assert len(b.describe_topic("auto").partitions) == 4
    b.close()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("sqlite://host/q.db", "host"),
        ("sqlite://", "no database file"),
        ("sqlite:///", "no database file"),
        ("sqlite:///folder/", "no database file"),
        ("sqlite:///:memory:", "memory://"),
        ("sqlite:///{db}?synchronous=SOMETIMES", "synchronous"),
        ("sqlite:///{db}?synchronus=FULL", "did you mean 'synchronous'"),
        ("sqlite:///{db}?path=/elsewhere.db", "unknown option 'path'"),
        ("sqlite:///{db}?busy_timeout_s=-1", "busy_timeout_s"),
        ("sqlite:///{db}?ack_timeout_s=soon", "ack_timeout_s"),
        ("sqlite:///{db}?poll_max_s=0", "poll_max_s"),
        ("sqlite:///{db}?retention_max_messages=-5", "retention_max_messages"),
        ("sqlite:///{db}?synchronous=FULL&synchronous=OFF", "twice"),
    ],
)
def test_bad_urls_raise_config_error(url: str, match: str, db: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        connect(url.format(db=db))
    assert not db.exists()


def test_capabilities_are_memorys_plus_multi_process() -> None:
    from infeed.brokers.memory import MemoryBroker

    assert SQLiteBroker.capabilities == MemoryBroker.capabilities | {Capability.MULTI_PROCESS}


# -- the file: WAL, synchronous, schema version -----------------------------------------------


@pytest.mark.parametrize(("option", "level"), [("", 1), ("synchronous=FULL", 2), ("synchronous=OFF", 0)])
def test_wal_is_on_and_synchronous_is_applied(db: Path, option: str, level: int) -> None:
    b = open_db(db, option)
    assert b._db.conn().execute("PRAGMA synchronous").fetchone()[0] == level
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()
    b.close()


def test_unknown_schema_version_is_refused(db: Path) -> None:
    open_db(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(BrokerError, match="schema version 99"):
        open_db(db)


def test_a_database_that_is_not_infeeds_is_refused(db: Path) -> None:
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE mine (x)")
    raw.close()
    with pytest.raises(BrokerError, match="not infeed's"):
        open_db(db)
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left as it was
    raw.close()


def test_close_and_reopen_keeps_messages_offsets_and_commits(db: Path) -> None:
    first = open_db(db, "default_partitions=2")
    first.publish_many("t", [Message(f"m{i}".encode(), key=b"k", headers={"i": str(i)}) for i in range(10)])
    consumer = first.subscribe("t", group="g")
    got = drain(consumer, 4)
    consumer.commit(got[-1].next_position)
    first.close()
    first.close()
    with pytest.raises(BrokerError, match="closed"):
        first.publish("t", b"late")
    with pytest.raises(BrokerError, match="closed"):
        consumer.receive(timeout_s=0)

    second = open_db(db)
    again = second.subscribe("t", group="g")
    assert again.committed() == {got[-1].partition: got[-1].next_position}
    rest = drain(again, 6)
    assert [d.payload for d in got + rest] == [f"m{i}".encode() for i in range(10)]
    assert [dict(d.headers) for d in rest] == [{"i": str(i)} for i in range(4, 10)]
    assert second.list_topics() == ["t"]
    second.close()


# -- concurrency: threads, processes, fork ----------------------------------------------------


def test_threads_produce_and_consume_without_loss_or_reordering(broker: SQLiteBroker) -> None:
    broker.create_topic("t", partitions=3)
    producers, per = 4, 250
    seen: list[Delivery] = []
    seen_lock = threading.Lock()
    done_producing = threading.Event()
    errors: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            for lo in range(0, per, 25):
                msgs = [Message(f"{n}:{i}".encode(), key=f"p{n}") for i in range(lo, lo + 25)]
                broker.publish_many("t", msgs[:20])
                for m in msgs[20:]:
                    broker.publish("t", m.payload, key=m.key)
        except BaseException as exc:
            errors.append(exc)

    def consume() -> None:
        try:
            consumer = broker.subscribe("t", group="g")
            while True:
                batch = consumer.receive(max_messages=40, timeout_s=0.2)
                consumer.ack(batch)
                with seen_lock:
                    seen.extend(batch)
                    if not batch and done_producing.is_set() and len(seen) >= producers * per:
                        break
            consumer.close()
        except BaseException as exc:
            errors.append(exc)

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    writers = [threading.Thread(target=produce, args=(n,)) for n in range(producers)]
    for t in consumers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    done_producing.set()
    for t in consumers:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in consumers + writers)
    assert sorted(d.payload for d in seen) == sorted(
        f"{n}:{i}".encode() for n in range(producers) for i in range(per)
    )
    by_key: dict[bytes | None, list[Delivery]] = defaultdict(list)
    for d in seen:
        by_key[d.key].append(d)
    for ds in by_key.values():
        assert len({d.partition for d in ds}) == 1
        ds.sort(key=lambda d: d.position.offset)
        assert [int(d.payload.split(b":")[1]) for d in ds] == list(range(per))


_CHILD_PRODUCER = """
import sys
from infeed.brokers import connect
broker = connect(sys.argv[1])
tag = sys.argv[2]
for lo in range(0, 500, 50):
    broker.publish_many("t", [f"{tag}:{i}".encode() for i in range(lo, lo + 50)])
for i in range(500, 550):
    broker.publish("t", f"{tag}:{i}".encode())
broker.close()
"""


def test_two_processes_publish_at_once_without_loss(broker: SQLiteBroker, db: Path) -> None:
    consumer = broker.subscribe("t", group="g")  # also creates the topic, one partition
    children = [spawn_python("-c", _CHILD_PRODUCER, f"sqlite:///{db}", tag) for tag in "ab"]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    got = drain(consumer, 1100)
    for tag in "ab":
        mine = [int(d.payload.split(b":")[1]) for d in got if d.payload.startswith(tag.encode())]
        assert mine == list(range(550))
    assert [d.position.offset for d in got] == list(range(1100))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_opens_its_own_connection(broker: SQLiteBroker) -> None:
    broker.publish("t", b"parent")
    parent_conn = broker._db.conn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python 3.12+)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            if broker._db.conn() is parent_conn:
                code = 2
            else:
                broker.publish("t", b"child")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert broker._db.conn() is parent_conn
    assert sorted(d.payload for d in drain(broker.subscribe("t", group="g"), 2)) == [b"child", b"parent"]


# -- leases -----------------------------------------------------------------------------------


def test_expired_lease_is_redelivered_with_count_two(db: Path) -> None:
    b = open_db(db, "ack_timeout_s=0.3")
    b.publish("t", b"slow")
    holder = b.subscribe("t", group="g")
    other = b.subscribe("t", group="g")
    (first,) = holder.receive(timeout_s=5)
    # waits on the lease's deadline, not on a sleep
    (second,) = other.receive(timeout_s=10)
    assert (second.payload, second.position, second.delivery_count) == (b"slow", first.position, 2)
    assert b.describe_topic("t").groups[0].pending == 1
    with pytest.raises(LeaseLostError):
        holder.ack(first)
    other.ack(second)
    assert b.describe_topic("t").groups[0].pending == 0
    assert other.receive(timeout_s=0.5) == []
    b.close()


def test_close_gives_leases_back_at_once(broker: SQLiteBroker) -> None:
    broker.publish_many("t", [b"a", b"b", b"c"])
    first = broker.subscribe("t", group="g")
    assert len(first.receive(max_messages=3, timeout_s=5)) == 3
    first.close()
    first.close()
    with pytest.raises(ConsumerClosedError):
        first.receive()
    again = broker.subscribe("t", group="g").receive(max_messages=10, timeout_s=0)
    assert [(d.payload, d.delivery_count) for d in again] == [(b"a", 2), (b"b", 2), (b"c", 2)]


def test_broker_close_gives_back_its_consumers_leases(db: Path) -> None:
    first = open_db(db)
    first.publish_many("t", [b"a", b"b"])
    consumer = first.subscribe("t", group="g")  # left open
    assert len(consumer.receive(max_messages=2, timeout_s=5)) == 2
    first.close()
    second = open_db(db)
    assert [d.delivery_count for d in second.subscribe("t", group="g").receive(timeout_s=0)] == [2, 2]
    second.close()


def test_nack_with_a_stale_lease_settles_the_valid_ones_then_raises(broker: SQLiteBroker) -> None:
    broker.publish_many("t", [b"a", b"b", b"c"])
    consumer = broker.subscribe("t", group="g")
    a, b, c = consumer.receive(max_messages=3, timeout_s=5)
    consumer.seek(b.position)  # drops the leases of b and c
    with pytest.raises(LeaseLostError, match="2 deliveries"):
        consumer.nack([a, b, c], requeue=False, reason="bad")
    (dead,) = drain(broker.subscribe("t.dlq", group="inspect"), 1)
    assert dead.payload == b"a"
    assert dead.headers["x-infeed-dlq-reason"] == "bad"
    assert [d.payload for d in drain(consumer, 2)] == [b"b", b"c"]  # from the cursor, not as leases
    assert consumer.receive(timeout_s=0.2) == []


def test_requeue_keeps_the_count_and_comes_first(broker: SQLiteBroker) -> None:
    broker.publish_many("t", [b"a", b"b", b"c"])
    consumer = broker.subscribe("t", group="g")
    a, b = consumer.receive(max_messages=2, timeout_s=5)
    consumer.nack(b)
    consumer.ack(a)
    got = consumer.receive(max_messages=5, timeout_s=5)
    assert [(d.payload, d.delivery_count) for d in got] == [(b"b", 2), (b"c", 1)]
    with pytest.raises(LeaseLostError):
        consumer.ack(b)  # the requeued lease is gone; the new one has another token


def test_partial_acks_and_nacks_split_a_batch_lease(db: Path) -> None:
    b = open_db(db, "ack_timeout_s=1.5")  # long enough that nothing expires before the last part
    b.publish_many("t", [f"m{i}".encode() for i in range(10)])
    consumer = b.subscribe("t", group="g")
    batch = consumer.receive(max_messages=10, timeout_s=5)
    assert len(batch) == 10
    consumer.ack([batch[7], batch[2], batch[3]])  # out of order, from the middle
    consumer.nack([batch[5]])
    assert b.describe_topic("t").groups[0].pending == 6
    (again,) = consumer.receive(max_messages=10, timeout_s=0)  # only the requeued one is due
    assert (again.payload, again.delivery_count) == (b"m5", 2)
    consumer.ack([batch[0], batch[1], again])
    with pytest.raises(LeaseLostError, match="2 deliveries"):
        consumer.ack([batch[4], batch[4], batch[5]])  # a duplicate, and a lease that passed on
    # the rest expires and comes back with count 2, in offset order, in two receives
    first = consumer.receive(max_messages=2, timeout_s=10)
    rest = consumer.receive(max_messages=10, timeout_s=0)
    assert [(d.payload, d.delivery_count) for d in first + rest] == [(b"m6", 2), (b"m8", 2), (b"m9", 2)]
    consumer.ack([*first, *rest])
    assert b.describe_topic("t").groups[0].pending == 0
    assert consumer.receive(timeout_s=1.7) == []
    b.close()


def test_seek_inside_a_leased_batch_keeps_the_leases_before_it(broker: SQLiteBroker) -> None:
    broker.publish_many("t", [f"m{i}".encode() for i in range(6)])
    consumer = broker.subscribe("t", group="g")
    batch = consumer.receive(max_messages=6, timeout_s=5)
    consumer.seek(batch[3].position)
    with pytest.raises(LeaseLostError, match="1 deliveries"):
        consumer.ack([batch[1], batch[4]])
    consumer.ack([batch[0], batch[2]])
    assert [(d.payload, d.delivery_count) for d in drain(consumer, 3)] == [(b"m3", 1), (b"m4", 1), (b"m5", 1)]
    assert broker.describe_topic("t").groups[0].pending == 0


def test_receive_wakes_on_a_publish_from_another_thread(broker: SQLiteBroker) -> None:
    consumer = broker.subscribe("t", group="g")
    got: list[Delivery] = []
    waiter = threading.Thread(target=lambda: got.extend(consumer.receive(timeout_s=30)))
    waiter.start()
    broker.publish("t", b"wake")
    waiter.join(timeout=30)
    assert [d.payload for d in got] == [b"wake"]


def test_a_deleted_topic_is_not_confused_with_a_new_one(broker: SQLiteBroker) -> None:
    broker.publish("t", b"old")
    consumer = broker.subscribe("t", group="g")
    broker.delete_topic("t")
    broker.publish("t", b"new")
    for call in (lambda: consumer.receive(timeout_s=0), consumer.committed):
        with pytest.raises(TopicNotFoundError):
            call()
    assert [d.payload for d in drain(broker.subscribe("t", group="g"), 1)] == [b"new"]


# -- retention --------------------------------------------------------------------------------


def test_trim_by_commits_count_and_age(broker: SQLiteBroker) -> None:
    broker.publish_many("t", [f"m{i}".encode() for i in range(10)])
    late = broker.subscribe("t", group="late")  # never reads, never commits
    g, h = broker.subscribe("t", group="g"), broker.subscribe("t", group="h")
    g.commit(Position("t", 0, 4))
    h.commit(Position("t", 0, 6))
    assert broker.trim("t") == 0  # "late" has committed nothing
    late.commit(Position("t", 0, 9))
    assert broker.trim("t") == 4
    info = broker.describe_topic("t").partitions[0]
    assert (info.low, info.high, info.depth) == (4, 10, 6)
    assert broker.trim("t", committed=False, max_messages=3) == 3
    assert broker.trim("t", committed=False, max_age_s=3600) == 0
    assert [d.payload for d in drain(g, 3)] == [b"m7", b"m8", b"m9"]  # the cursor moves up to low
    assert broker.trim("t", committed=False, max_age_s=0) == 3
    info = broker.describe_topic("t").partitions[0]
    assert (info.low, info.high, info.depth) == (10, 10, 0)
    with pytest.raises(TopicNotFoundError):
        broker.trim("missing")
    with pytest.raises(ValueError, match="max_messages"):
        broker.trim("t", max_messages=-1)


def test_retention_options_trim_on_publish(db: Path) -> None:
    b = open_db(db, "retention_max_messages=10")
    b.publish_many("t", [b"x"] * 100)
    assert b.describe_topic("t").depth == 10
    b.close()


# -- errors -----------------------------------------------------------------------------------


def test_every_sqlite3_exception_class_is_mapped() -> None:
    exported = [
        v
        for v in vars(sqlite3).values()
        if isinstance(v, type) and issubclass(v, sqlite3.Error | sqlite3.Warning)
    ]
    assert len(exported) >= 9
    for cls in exported:
        assert cls in ERROR_MAP, f"sqlite3.{cls.__name__} has no entry in ERROR_MAP"
        assert isinstance(raise_through(map_errors("x.db"), cls("boom"), "x.db"), BrokerError)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("database is locked", BrokerTimeoutError),
        ("database table is locked", BrokerTimeoutError),
        ("unable to open database file", BrokerConnectionError),
        ("no such table: messages", BrokerError),
    ],
)
def test_operational_errors_by_message(message: str, kind: type[BrokerError]) -> None:
    with pytest.raises(BrokerError) as info:
        with map_errors("x.db"):
            raise sqlite3.OperationalError(message)
    assert type(info.value) is kind


def test_a_held_write_lock_times_out(db: Path) -> None:
    b = open_db(db, "busy_timeout_s=0.05")
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerTimeoutError, match="busy_timeout_s") as info:
        b.publish("t", b"x")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    raw.execute("ROLLBACK")
    raw.close()
    b.publish("t", b"x")
    assert b.describe_topic("t").depth == 1
    b.close()


def test_unopenable_paths_raise_connection_errors(tmp_path: Path) -> None:
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(BrokerConnectionError):
        open_db(tmp_path / "a-folder.db")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BrokerConnectionError):
        open_db(tmp_path / "a-file" / "q.db")
