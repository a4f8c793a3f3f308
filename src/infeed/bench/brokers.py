"""Figure 1, broker overhead: infeed's msgs/s ÷ the raw client's, on the same broker, in the same run.

For every backend that is there (``memory`` and ``sqlite`` always; the others when scripts/brokers
started their broker and infeed's backend module imports) and for each payload (``msg-1k``,
``sample-784``), infeed publishes with ``publish_many`` of 500 and consumes with
``receive(max_messages=500)`` + ``ack`` of each batch; the raw client does its best
(``infeed.bench.baselines``). Each repetition uses a fresh topic; infeed and the raw client
alternate (A/B, then B/A) so drift hits both; a ratio pairs each repetition with its neighbour.
``memory://`` has no raw client: its numbers are absolute, with no ratio.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from rich.console import Console

from infeed.bench import _brokers_report as report
from infeed.bench import harness
from infeed.bench.baselines import (
    CLIENT_PACKAGES,
    RAW_BASELINES,
    RECEIVE_TIMEOUT_S,
    BenchError,
    Side,
    expect,
    load_baseline,
)
from infeed.bench.payloads import PAYLOADS, Payload, payload
from infeed.brokers import Broker, Consumer, Message, backend_class, connect

__all__ = [
    "BACKENDS",
    "BATCH",
    "DEFAULT_BROKERS_FILE",
    "DEFAULT_SECONDS",
    "TARGET_RATIO",
    "Backend",
    "InfeedSide",
    "discover",
    "run",
]

#: infeed ÷ raw msgs/s that figure 1 asks for (BENCHMARKS.md).
TARGET_RATIO = 0.8
#: Messages per publish call and per receive.
BATCH = 500
#: Where scripts/brokers records the brokers it started.
DEFAULT_BROKERS_FILE = Path(os.environ.get("INFEED_BROKERS_FILE", ".infeed/brokers.json"))
#: Seconds the slowest measurement of a round should take (the message count is sized to it).
DEFAULT_SECONDS = 1.5
#: Messages of the untimed warm-up round that also sizes the count (at most ``messages`` if given).
WARMUP_MESSAGES = 4000
#: No measurement is sized past this many times ``seconds``.
_MAX_SPAN = 3.0
_MIN_MESSAGES = 2000


@dataclass(frozen=True)
class Backend:
    """A backend of figure 1.

    Attributes:
        name: its name in scripts/brokers and in the table.
        scheme: infeed's URL scheme for it.
        embedded: needs no broker process.
        max_messages: most messages per round (bounds the broker's memory).
        url_options: more URLs of the broker (keys of its ``urls`` in the state file) that
            infeed's URL carries as ``KEY_url=...`` options (Pulsar's admin API).
    """

    name: str
    scheme: str
    embedded: bool = False
    max_messages: int = 60_000
    url_options: tuple[str, ...] = ()


BACKENDS = (
    Backend("memory", "memory", embedded=True, max_messages=200_000),
    Backend("sqlite", "sqlite", embedded=True, max_messages=120_000),
    Backend("redis", "redis"),
    Backend("rabbitmq", "amqp"),
    Backend("nats", "nats"),
    Backend("kafka", "kafka"),
    Backend("pulsar", "pulsar", url_options=("admin",)),
)


class InfeedSide(Side):
    """infeed's side: a fresh broker connection per round, ``publish_many`` / ``receive`` + ``ack``."""

    def __init__(self, url_for: Callable[[str], str], headers: Mapping[str, str] | None, scheme: str) -> None:
        self._url_for = url_for
        self._headers = dict(headers) if headers else None
        self._file_based = scheme == "sqlite"
        self.label = (
            f"infeed {scheme}://: publish_many {BATCH}/call; receive(max_messages={BATCH}) + ack of the batch"
        )
        self._broker: Broker | None = None
        self._consumer: Consumer | None = None

    def prepare(self, topic: str) -> None:
        """Connect, create the topic (one partition) and subscribe the group before publishing."""
        self._broker = connect(self._url_for(topic))
        self._broker.create_topic(topic, partitions=1)
        self._consumer = self._broker.subscribe(topic, group="bench", start="earliest")

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """``publish_many`` each batch (as ``Message``s with the codec header where it has one)."""
        broker, headers = self._broker, self._headers
        if broker is None:
            raise BenchError("produce before prepare")
        for batch in batches:
            if headers is None:
                broker.publish_many(topic, batch)
            else:
                broker.publish_many(topic, [Message(p, None, headers) for p in batch])

    def consume(self, topic: str, count: int, op: str) -> None:
        """``receive`` up to 500 and ``ack`` them, until ``count`` have come."""
        consumer = self._consumer
        if consumer is None:
            raise BenchError("consume before prepare")
        got = 0
        while got < count:
            deliveries = consumer.receive(max_messages=min(BATCH, count - got), timeout_s=RECEIVE_TIMEOUT_S)
            if not deliveries:
                break
            consumer.ack(deliveries)
            got += len(deliveries)
        expect(got, count, "infeed consume")

    def cleanup(self, topic: str) -> None:
        """Leave the group, delete the topic (or the database file), close the broker."""
        consumer, broker = self._consumer, self._broker
        self._consumer = self._broker = None
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close()
        if broker is not None:
            if not self._file_based:
                with contextlib.suppress(Exception):
                    broker.delete_topic(topic)
            broker.close()
        if self._file_based:
            path = self._url_for(topic).removeprefix("sqlite:///")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(path + suffix).unlink()


def _url_for(backend: Backend, url: str | None, workdir: Path) -> Callable[[str], str]:
    if backend.scheme == "sqlite":
        return lambda topic: f"sqlite:///{workdir / topic}.db"
    if backend.scheme == "memory":
        return lambda _topic: "memory://"
    if url is None:
        raise ValueError(f"{backend.name} needs a broker URL")
    fixed = url
    return lambda _topic: fixed


def _with_options(url: str | None, options: Mapping[str, str | None]) -> str | None:
    """``url`` with ``options`` in its query; None if it or any option is missing."""
    if not url or not all(options.values()):
        return None
    if not options:
        return url
    return f"{url}{'&' if '?' in url else '?'}{urlencode(options)}"


def discover(
    names: Sequence[str] | None = None, brokers_file: Path = DEFAULT_BROKERS_FILE
) -> tuple[list[tuple[Backend, str | None]], list[dict[str, str]]]:
    """Return the backends to measure (with infeed's URL for them) and the skipped ones with why.

    Args:
        names: only these backends (default: all of ``BACKENDS``).
        brokers_file: the state file of scripts/brokers.

    Raises:
        ValueError: for a name that is not a backend of figure 1.
    """
    known = {b.name: b for b in BACKENDS}
    for name in names or ():
        if name not in known:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")
    try:
        running: dict[str, Any] = json.loads(brokers_file.read_text())
    except (OSError, ValueError):
        running = {}
    chosen, skipped = [], []
    for backend in BACKENDS:
        if names and backend.name not in names:
            continue
        url = None
        if not backend.embedded:
            entry = running.get(backend.name) if isinstance(running, dict) else None
            urls = (entry or {}).get("urls", {})
            url = _with_options(urls.get("url"), {f"{k}_url": urls.get(k) for k in backend.url_options})
            if not url:
                reason = (
                    f"broker not running (scripts/brokers start {backend.name}; state file {brokers_file})"
                )
                skipped.append({"backend": backend.name, "reason": reason})
                continue
        try:
            backend_class(backend.scheme)
        except Exception as exc:  # a backend being written may fail in any way: skip it, say why
            reason = f"infeed backend {backend.scheme}:// does not import: {type(exc).__name__}: {exc}"
            skipped.append({"backend": backend.name, "reason": reason})
            continue
        chosen.append((backend, url))
    return chosen, skipped


def _round(side: Side, topic: str, batches: list[list[bytes]], count: int) -> dict[str, float]:
    """Return the seconds of each produce variant and each consume variant of ``side``.

    Each produce variant writes a fresh topic; the consume variants read what the first wrote.
    """
    seconds: dict[str, float] = {}
    for i, produce_op in enumerate(side.produce_ops):
        name = topic if i == 0 else f"{topic}-{produce_op}"
        side.prepare(name)
        try:
            seconds[produce_op] = harness.timed(functools.partial(side.produce, name, batches, produce_op))
            if i == 0:
                for op in side.consume_ops:
                    seconds[op] = harness.timed(functools.partial(side.consume, name, count, op))
        finally:
            side.cleanup(name)
    return seconds


def _size(rates: list[float], seconds: float, limit: int) -> int:
    """Messages per round: ``seconds`` at the median rate, at most ``_MAX_SPAN`` x at the slowest.

    ``rates`` holds the warm-up rate of each side's produce and consume (its best variant of each).
    """
    n = min(seconds * statistics.median(rates), _MAX_SPAN * seconds * min(rates))
    return max(_MIN_MESSAGES, min(limit, int(n) // BATCH * BATCH))


def _bench_backend(
    backend: Backend,
    url: str | None,
    loads: Sequence[Payload],
    *,
    repetitions: int,
    messages: int | None,
    seconds: float,
    workdir: Path,
    run_id: str,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    raw = load_baseline(backend.name, url, workdir) if backend.name in RAW_BASELINES else None
    rows: list[dict[str, Any]] = []
    try:
        for load in loads:
            sides: dict[str, Side] = {
                "infeed": InfeedSide(_url_for(backend, url, workdir), load.headers, backend.scheme)
            }
            if raw is not None:
                sides["raw"] = raw
            serial = itertools.count()

            def topic(side: str, load: Payload = load, serial: itertools.count[int] = serial) -> str:
                return f"bench-{run_id}-{backend.name}-{load.name}-{side}-{next(serial)}"

            # Untimed warm-up round per side: connections, caches, code paths; it also sizes the count.
            n_warm = min(WARMUP_MESSAGES, messages) if messages else WARMUP_MESSAGES
            warm = {
                name: _round(side, topic(name), load.batches(n_warm, BATCH), n_warm)
                for name, side in sides.items()
            }
            rates = [
                n_warm / min(t[op] for op in ops)
                for side, t in zip(sides.values(), warm.values(), strict=True)
                for ops in (side.produce_ops, side.consume_ops)
            ]
            count = messages or _size(rates, seconds, backend.max_messages)
            batches = load.batches(count, BATCH)
            say(f"  {backend.name} {load.name}: {count:,} messages x {repetitions} repetitions")
            times: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
            for rep in range(repetitions):
                order = list(sides) if rep % 2 == 0 else list(reversed(sides))
                for name in order:
                    for op, s in _round(sides[name], topic(name), batches, count).items():
                        times[name].setdefault(op, []).append(s)
            labels = {name: side.label for name, side in sides.items()}
            rows += report.rows(
                backend.name,
                load,
                count,
                times,
                labels,
                {"produce": raw.produce_ops, "consume": raw.consume_ops} if raw else {},
                TARGET_RATIO,
            )
    finally:
        if raw is not None:
            raw.close()
    return rows


def run(
    *,
    backends: Sequence[str] | None = None,
    payloads: Sequence[str] | None = None,
    repetitions: int = harness.DEFAULT_REPETITIONS,
    messages: int | None = None,
    seconds: float = DEFAULT_SECONDS,
    out_dir: Path = harness.DEFAULT_OUT_DIR,
    brokers_file: Path = DEFAULT_BROKERS_FILE,
    console: Console | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Measure figure 1; write ``brokers.json`` (and ``brokers.png``) to ``out_dir``; print the table.

    Args:
        backends: only these backends (default: every one that is there).
        payloads: only these workloads (default: ``msg-1k`` and ``sample-784``).
        repetitions: rounds per side, each on a fresh topic (at least 1; BENCHMARKS.md wants 3).
        messages: messages per round (a multiple of 500 is best); default: sized so the slowest
            measurement of a round takes about ``seconds``.
        seconds: the target length of the slowest measurement when ``messages`` is not given.
        out_dir: where the JSON and PNG go.
        brokers_file: the state file of scripts/brokers.
        console: where the table and progress go.
        plot: also write the PNG.

    Returns:
        what was written to ``brokers.json``.

    Raises:
        ValueError: for an unknown backend or payload, or a bad count.
    """
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    if messages is not None and messages < 1:
        raise ValueError(f"messages must be >= 1, got {messages}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    console = console or harness.wide_console()
    loads = [payload(name) for name in (payloads or list(PAYLOADS))]
    chosen, skipped = discover(backends, brokers_file)
    for skip in skipped:
        console.print(f"[yellow]skip[/] {skip['backend']}: {skip['reason']}")
    started = time.monotonic()
    info = harness.machine_info(CLIENT_PACKAGES)
    run_id = uuid.uuid4().hex[:8]
    results: list[dict[str, Any]] = []
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="infeed-bench-") as tmp:
        for backend, url in chosen:
            console.print(f"[bold]{backend.name}[/] ({url or backend.scheme + '://'})")
            try:
                rows = _bench_backend(
                    backend,
                    url,
                    loads,
                    repetitions=repetitions,
                    messages=messages,
                    seconds=seconds,
                    workdir=Path(tmp),
                    run_id=run_id,
                    say=console.print,
                )
            except Exception as exc:  # one broken backend must not cost the others' numbers
                reason = f"failed: {type(exc).__name__}: {exc}"
                console.print(f"[red]skip[/] {backend.name}: {reason}")
                skipped.append({"backend": backend.name, "reason": reason})
                continue
            results += rows
            measured[backend.name] = {
                "url": url,
                "infeed": rows[0]["infeed"]["label"],
                "raw": rows[0]["raw"]["label"] if rows[0]["raw"] else None,
            }
    info["load_average_end"] = harness.load_average()
    data = {
        "figure": "brokers",
        "title": "Broker overhead: infeed msgs/s ÷ the raw client's best, same broker, same run",
        "target_ratio": TARGET_RATIO,
        "method": {
            "repetitions": repetitions,
            "batch": BATCH,
            "order": "infeed/raw alternate each repetition (A/B, B/A, ...); ratios pair neighbours",
            "fresh_topic_per_repetition": True,
            "warmup_messages": WARMUP_MESSAGES,
            "seconds_target": None if messages else seconds,
            "timer": "time.perf_counter",
            "consume": "receive/fetch up to 500 + one ack call per batch, until all have come",
        },
        "machine": info,
        "payloads": {
            p.name: {
                "bytes": len(p.data),
                "description": p.description,
                "infeed_headers": dict(p.headers or {}),
            }
            for p in loads
        },
        "backends": measured,
        "skipped": skipped,
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    harness.write_json(out_dir / "brokers.json", data)
    report.print_table(data, console)
    if plot:
        report.plot(data, out_dir / "brokers.png")
    console.print(f"wrote {out_dir / 'brokers.json'}" + (f" and {out_dir / 'brokers.png'}" if plot else ""))
    return data
