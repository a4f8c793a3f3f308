"""``infeed demo --round-trip``: a produce -> consume round trip of a real dataset.

scikit-learn's bundled digits (1,797 8x8 images as 64 float64 features and an int64 label; they ship
inside the package, nothing is downloaded) go into a fresh topic as record batches, come back
through a consumer group that acks and commits, and are checked to be every sample exactly once
and bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infeed.cli._digits import load_digits
from infeed.cli._shared import (
    err,
    fail,
    human_bytes,
    out,
    plural,
    rate,
    records_progress,
)

if TYPE_CHECKING:
    import numpy as np

    from infeed.brokers import Broker
    from infeed.codecs import RecordBatch

__all__ = ["DEFAULT_RECORDS_PER_MESSAGE", "DEMO_GROUP", "DEMO_TOPIC", "RoundTripCheck", "round_trip"]

#: The round trip's topic, deleted and created afresh on every run.
DEMO_TOPIC = "demo.digits"
#: The consumer group that reads the samples back.
DEMO_GROUP = "demo"
#: Records per message: record batches are how training data should travel.
DEFAULT_RECORDS_PER_MESSAGE = 64
#: Give up when nothing arrives for this long (every message is already in the topic).
_IDLE_S = 5.0


def round_trip(url: str, *, records_per_message: int, partitions: int) -> None:
    """Produce the digits into a fresh topic, consume them back, check and print the outcome.

    Raises:
        typer.Exit: some sample is missing, duplicated or altered.
    """
    from infeed.brokers import connect

    x, y = load_digits()
    with connect(url) as b:
        if DEMO_TOPIC in b.list_topics():
            b.delete_topic(DEMO_TOPIC)
        b.create_topic(DEMO_TOPIC, partitions=partitions)
        sent = _produce(b, x, y, records_per_message)
        check = RoundTripCheck(x, y)
        got = _consume(b, check)
    _summary(url, partitions, x, y, records_per_message, sent, got, check)
    problems = check.problems()
    if problems:
        raise fail("verification failed: " + "; ".join(problems))


@dataclass
class _Leg:
    messages: int = 0
    nbytes: int = 0
    seconds: float = 0.0


def _produce(b: Broker, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], per_message: int) -> _Leg:
    import numpy as np

    from infeed.codecs import RecordBatch
    from infeed.streams import Producer

    leg = _Leg()
    n = len(x)
    batch = RecordBatch({"id": np.arange(n, dtype=np.int64), "x": x, "y": y})
    producer = Producer(b, DEMO_TOPIC, records_per_message=per_message, messages_per_publish=4)
    chunk = per_message * 4
    started = time.monotonic()
    with records_progress(err()) as progress:
        task = progress.add_task(f"producing to {DEMO_TOPIC}", total=n)
        for start in range(0, n, chunk):
            producer.send_batch(batch.slice(start, start + chunk))
            producer.flush()
            progress.update(task, completed=producer.records_sent)
    leg.seconds = time.monotonic() - started
    leg.messages = producer.messages_sent
    depth = b.describe_topic(DEMO_TOPIC).depth
    if depth != leg.messages:
        raise fail(f"the topic holds {depth} messages after {leg.messages} were published")
    return leg


def _consume(b: Broker, check: RoundTripCheck) -> _Leg:
    from infeed.streams import StreamConsumer
    from infeed.types import Position

    leg = _Leg()
    n = len(check.x)
    started = time.monotonic()
    with (
        StreamConsumer(b.subscribe(DEMO_TOPIC, group=DEMO_GROUP, start="earliest")) as stream,
        records_progress(err()) as progress,
    ):
        task = progress.add_task(f"consuming in group {DEMO_GROUP}", total=n)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < _IDLE_S:
            # Once all are in, one more look without waiting: anything extra is a duplicate.
            received = stream.receive(max_messages=16, timeout_s=0.0 if check.received >= n else 0.5)
            if not received:
                if check.received >= n:
                    break
                continue
            idle_since = time.monotonic()
            for item in received:
                check.add(item.batch)
                leg.nbytes += len(item.delivery.payload)
            stream.ack(received)
            ends: dict[int, int] = {}
            for item in received:
                p = item.delivery.position
                ends[p.partition] = max(ends.get(p.partition, 0), p.offset + 1)
            stream.commit([Position(DEMO_TOPIC, p, offset) for p, offset in ends.items()])
            leg.messages += len(received)
            progress.update(task, completed=min(check.received, n))
        check.dead_lettered = stream.dead_lettered
    leg.seconds = time.monotonic() - started
    return leg


@dataclass
class RoundTripCheck:
    """Checks that received batches hold every sample of ``x``/``y`` exactly once, bit for bit.

    Args:
        x: the features that were sent, row ``i`` for sample id ``i``.
        y: the labels that were sent.
    """

    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    received: int = 0
    dead_lettered: int = 0
    counts: np.ndarray[Any, Any] = field(init=False)
    mismatches: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        import numpy as np

        self.counts = np.zeros(len(self.x), dtype=np.int64)

    def add(self, batch: RecordBatch) -> None:
        """Count a received batch (fields ``id``, ``x``, ``y``) and compare it with what was sent."""
        import numpy as np

        self.received += len(batch)
        cols = batch.columns
        if set(cols) != {"id", "x", "y"}:
            self.mismatches.append(f"a batch has fields {sorted(cols)}, not id, x, y")
            return
        ids = np.asarray(cols["id"])
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.x)):
            self.mismatches.append(f"sample ids out of range: {ids.min()}..{ids.max()}")
            return
        np.add.at(self.counts, ids, 1)
        for name, sent in (("x", self.x), ("y", self.y)):
            got, want = cols[name], sent[ids]
            if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
                self.mismatches.append(
                    f"field {name} of samples {ids[0]}..{ids[-1]} differs from what was sent"
                )

    def problems(self) -> list[str]:
        """Return what is wrong (missing, duplicated or altered samples); empty when all is well."""
        import numpy as np

        found = list(self.mismatches)
        missing = int(np.count_nonzero(self.counts == 0))
        extra = int(np.count_nonzero(self.counts > 1))
        if missing:
            found.append(f"{missing} samples never came back")
        if extra:
            found.append(f"{extra} samples came back more than once")
        if self.dead_lettered:
            found.append(f"{self.dead_lettered} messages were dead-lettered")
        return found


def _summary(
    url: str,
    partitions: int,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    per_message: int,
    sent: _Leg,
    got: _Leg,
    check: RoundTripCheck,
) -> None:
    from rich.table import Table

    n = len(x)
    ok = not check.problems()
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("broker", url)
    table.add_row("topic", f"{DEMO_TOPIC} ({plural(partitions, 'partition')}), group {DEMO_GROUP}")
    table.add_row("samples", f"{n:,} ({x.shape[1]} {x.dtype} features + {y.dtype} label)")
    table.add_row(
        "messages", f"{sent.messages:,} sent, {got.messages:,} received ({per_message} samples each)"
    )
    table.add_row("bytes", human_bytes(got.nbytes))
    table.add_row("produce", f"{sent.seconds:.3f} s, {rate(n, sent.seconds)} samples/s")
    table.add_row("consume", f"{got.seconds:.3f} s, {rate(check.received, got.seconds)} samples/s")
    verdict = "[green]OK[/]: every sample exactly once, bit-identical" if ok else "[red]FAILED[/]"
    table.add_row("verified", verdict)
    console = out()
    console.print("infeed demo: digits round trip")
    console.print(table)
    if ok:
        console.print(
            f"look inside: infeed --broker {url} topics describe {DEMO_TOPIC}", markup=False, soft_wrap=True
        )
