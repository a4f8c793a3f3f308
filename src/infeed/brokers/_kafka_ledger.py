"""Per-partition ack ledger of the ``kafka://`` backend, and its form in Kafka's commit metadata.

Kafka keeps one committed offset per group and partition and nothing per message. infeed keeps
per-message acks and delivery counts on the client, in a :class:`Ledger` per owned partition, and
stores the ledger in the group's commit for that partition:

* the committed **offset** is the *ack watermark*: every offset below it is acked (or skipped by
  ``seek``); a member that takes the partition over starts fetching there;
* the commit **metadata** (a short JSON string) holds the user's own ``commit`` position (``c``),
  the end of what was handed out (``f``) and, run-length encoded from the watermark, the state of
  every offset between the watermark and ``f`` (``r``): ``0`` acked, ``k >= 1`` handed out ``k``
  times and not acked.

A new owner skips the offsets marked acked and hands the others out with ``k + 1``. The encoding
is capped at :data:`MAX_METADATA_CHARS` (Kafka's ``offset.metadata.max.bytes`` defaults to 4096):
past the cap the tail of the runs is dropped and ``f`` moved back, so those offsets count as never
handed out (delivered again with count 1, acked ones included: at-least-once).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from infeed.types import Delivery

__all__ = ["MAX_METADATA_CHARS", "Ledger", "Pending", "Saved", "decode", "encode"]

#: Longest metadata string written (Kafka's default offset.metadata.max.bytes is 4096).
MAX_METADATA_CHARS = 3000
#: Marks metadata written by infeed (other Kafka clients write their own strings, or none).
_TAG = "infeed"


@dataclass(frozen=True, slots=True)
class Saved:
    """A ledger as stored in one Kafka commit (see the module docstring).

    Attributes:
        offset: the committed Kafka offset: the ack watermark.
        commit: the user's commit position, if any.
        end: one past the last offset handed out.
        runs: ``(start, state)`` pairs over ``[offset, end)``, each up to the next start;
            state 0 is acked, k >= 1 handed out k times and not acked.
        ours: whether infeed wrote it (else ``offset`` is another client's resume point).
    """

    offset: int
    commit: int | None = None
    end: int = 0
    runs: tuple[tuple[int, int], ...] = ()
    ours: bool = True

    @property
    def unacked(self) -> int:
        """Offsets handed out and not acked, as stored."""
        total = 0
        for i, (start, state) in enumerate(self.runs):
            stop = self.runs[i + 1][0] if i + 1 < len(self.runs) else self.end
            if state:
                total += stop - start
        return total


def encode(saved: Saved) -> str:
    """Return the metadata string of ``saved`` (its offset travels as the Kafka offset)."""
    doc: dict[str, Any] = {_TAG: 1}
    if saved.commit is not None:
        doc["c"] = saved.commit
    runs = list(saved.runs)
    end = saved.end
    while True:
        if runs:
            doc["f"] = end
            doc["r"] = [x for start, state in runs for x in (start - saved.offset, state)]
        else:
            doc.pop("f", None)
            doc.pop("r", None)
        text = json.dumps(doc, separators=(",", ":"))
        if len(text) <= MAX_METADATA_CHARS or not runs:
            return text
        # Too long: forget the tail; those offsets count as never handed out (module docstring).
        end = runs[len(runs) // 2][0]
        runs = runs[: len(runs) // 2]


def decode(offset: int, metadata: str | None) -> Saved:
    """Read a committed ``offset`` and its ``metadata``; foreign metadata keeps only the offset."""
    try:
        doc = json.loads(metadata) if metadata else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get(_TAG) != 1:
        return Saved(offset, commit=offset, end=offset, ours=False)
    commit = doc.get("c")
    flat = doc.get("r") or []
    end = doc.get("f", offset)
    ok = (
        (commit is None or _is_offset(commit))
        and _is_offset(end)
        and isinstance(flat, list)
        and len(flat) % 2 == 0
        and all(_is_offset(x) for x in flat)
    )
    if not ok:
        return Saved(offset, commit=commit if _is_offset(commit) else None, end=offset)
    runs = tuple((offset + flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    if any(b[0] <= a[0] for a, b in itertools.pairwise(runs)) or (runs and runs[-1][0] >= end):
        runs, end = (), offset
    return Saved(offset, commit, max(end, offset), runs)


def _is_offset(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(slots=True)
class Pending:
    """A delivery handed out and not acked: the copy to hand out again, and its lease."""

    delivery: Delivery
    #: monotonic time the lease ends; None once given back (nack with requeue)
    deadline: float | None


@dataclass(eq=False)
class Ledger:
    """What one member knows of one partition it owns (see the module docstring).

    Attributes:
        partition: the partition.
        fetch: the next offset expected from Kafka; everything below is handed out or done.
        commit: the user's commit position.
        pending: offset -> delivery handed out and not acked (always below ``fetch``).
        inherited: ``(start, state)`` runs up to ``inherited_end``, from the last owner.
        inherited_end: end of ``inherited``.
        saved: the (offset, metadata) last written, to tell whether someone else wrote since.
        dirty: changed since last written.
    """

    partition: int
    fetch: int
    commit: int | None = None
    pending: dict[int, Pending] = field(default_factory=dict)
    inherited: list[tuple[int, int]] = field(default_factory=list)
    inherited_end: int = 0
    saved: tuple[int, str] | None = None
    dirty: bool = False

    @classmethod
    def take_over(cls, partition: int, saved: Saved) -> Ledger:
        """A ledger that resumes from a stored one."""
        ledger = cls(partition, saved.offset, saved.commit)
        if saved.runs and saved.end > saved.offset:
            ledger.inherited = list(saved.runs)
            ledger.inherited_end = saved.end
        return ledger

    def accept(self, offset: int) -> int | None:
        """Return the delivery count of ``offset``, just fetched from Kafka, or None to skip it.

        Offsets below ``fetch`` are stale (fetched before a seek); offsets the last owner saw
        acked are skipped.
        """
        if offset < self.fetch:
            return None
        self.fetch = offset + 1
        self.dirty = True
        runs = self.inherited
        if not runs:
            return 1
        while len(runs) > 1 and runs[1][0] <= offset:
            del runs[0]
        if offset >= self.inherited_end:
            runs.clear()
            return 1
        if runs[0][0] > offset:
            return 1
        state = runs[0][1]
        if offset + 1 >= self.inherited_end:
            runs.clear()
        return None if state == 0 else state + 1

    def lease(self, delivery: Delivery, deadline: float) -> None:
        """Record ``delivery`` as handed out until ``deadline``."""
        self.pending[delivery.position.offset] = Pending(delivery, deadline)

    def due(self, now: float) -> list[Pending]:
        """Deliveries whose lease ran out or that were given back, oldest offset first."""
        return [
            entry
            for _, entry in sorted(self.pending.items())
            if entry.deadline is None or entry.deadline <= now
        ]

    def hand_out_due(
        self, now: float, room: int, until: float | None, receipts: Iterator[object]
    ) -> list[Delivery]:
        """Hand out again, with the count one higher, up to ``room`` deliveries of :meth:`due`.

        Each is leased until ``until``, or (None) handed out acked: it leaves ``pending``.
        """
        out: list[Delivery] = []
        for entry in self.due(now)[:room]:
            d = entry.delivery
            again = Delivery(
                d.payload, d.key, d.headers, d.position, d.delivery_count + 1, d.timestamp, next(receipts)
            )
            if until is None:
                del self.pending[d.position.offset]
            else:
                self.pending[d.position.offset] = Pending(again, until)
            self.dirty = True
            out.append(again)
        return out

    def next_deadline(self) -> float | None:
        """The soonest lease end, if any delivery is leased."""
        deadlines = [e.deadline for e in self.pending.values() if e.deadline is not None]
        return min(deadlines) if deadlines else None

    def settle(self, offset: int, receipt: object) -> Pending | None:
        """Forget the delivery of ``offset`` if ``receipt`` is its latest; None if it is not."""
        entry = self.pending.get(offset)
        if entry is None or entry.delivery.receipt != receipt:
            return None
        del self.pending[offset]
        self.dirty = True
        return entry

    def seek(self, offset: int) -> None:
        """Resume at ``offset``: deliveries at or after it are dropped, the gap before it skipped."""
        for o in [o for o in self.pending if o >= offset]:
            del self.pending[o]
        runs = self.inherited
        if self.fetch <= offset < self.inherited_end and runs:
            while len(runs) > 1 and runs[1][0] <= offset:
                del runs[0]
            runs[0] = (max(runs[0][0], offset), runs[0][1])
        else:
            runs.clear()
        self.fetch = offset
        self.dirty = True

    def snapshot(self) -> Saved:
        """The ledger's stored form."""
        runs: list[tuple[int, int]] = []

        def push(start: int, state: int) -> None:
            if not runs or runs[-1][1] != state:
                runs.append((start, state))

        pending = self.pending
        after: int | None = None
        if pending:
            offsets = sorted(pending)
            state = -1
            for o in offsets:
                count = pending[o].delivery.delivery_count
                if after is not None and o > after:
                    if state != 0:
                        runs.append((after, 0))
                        state = 0
                if count != state:
                    runs.append((o, count))
                    state = count
                after = o + 1
        if after is not None and after < self.fetch:
            push(after, 0)
        end = self.fetch
        if self.inherited and self.inherited_end > self.fetch:
            runs_in = self.inherited
            for i, (start, state) in enumerate(runs_in):
                stop = runs_in[i + 1][0] if i + 1 < len(runs_in) else self.inherited_end
                if stop > self.fetch:
                    push(max(start, self.fetch), state)
            end = self.inherited_end
        while runs and runs[0][1] == 0:  # acked from the start: below the watermark
            del runs[0]
        return Saved(runs[0][0] if runs else end, self.commit, end, tuple(runs))
