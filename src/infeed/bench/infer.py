"""Figures 4 and 5, inference: throughput with dynamic batching, and latency overhead at low load.

Model ``mlp-784`` (Linear 784-256-ReLU-256-ReLU-10, one torch thread), requests ``req-784`` (one
``x`` float32 (1, 784) per request, infeed's msgpack protocol).

Figure 4, throughput at saturation: a backlog of requests is published before the clock starts;
the clock runs while one ``Worker`` (in this process) drains it — receive, batch, run the model,
publish the replies, ack (and commit). Requests/s with ``max_batch_size`` 32 and 128 ÷ the same
with ``max_batch_size=1`` (target ≥ 5x), and ÷ the model's own rows/s at the same batch size,
in-process, on tensors (the fraction of the model's speed the queue keeps). Every reply is read
back afterwards (untimed) to check each request was answered once.

Figure 5, latency at low load: one client, one request at a time (``Client.predict``), against a
worker in its own process, p50 and p99 over ``latency_requests`` requests; minus the same
statistics of a raw request-reply over the same broker with the engine's own client
(``infeed.bench._echo``), whose responder, also in its own process, runs the same model on the
same bytes — so the difference is what infeed adds. Measured with ``max_wait_s=0`` (the batcher
takes what is there) and with the default ``max_wait_s`` (it waits that long for company).

Kafka runs with ``linger_s=0`` on both sides (the raw producer too): the 5 ms default linger would
count once per batch in figure 4 and twice per request in figure 5.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from infeed.bench import harness
from infeed.bench._echo import ENGINES, raw_echo
from infeed.bench._infer_report import TARGETS, draw, print_tables
from infeed.bench._infer_serve import Server, worker_config
from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, expect
from infeed.bench.brokers import DEFAULT_BROKERS_FILE, Backend, discover
from infeed.bench.payloads import batched
from infeed.brokers import Broker, connect
from infeed.inference import (
    Client,
    ModelRegistry,
    Request,
    Worker,
    decode_reply,
    encode_request,
    request_topic,
)
from infeed.inference.batcher import DEFAULT_MAX_WAIT_S

__all__ = ["DEFAULT_LATENCY_REQUESTS", "DEFAULT_SECONDS", "SIZES", "TARGETS", "cli", "run"]

#: ``max_batch_size`` of figure 4's runs; the first is the unbatched baseline.
SIZES = (1, 32, 128)
#: Seconds each throughput round should take (its request count is sized to it).
DEFAULT_SECONDS = 1.0
#: Sequential requests per latency round.
DEFAULT_LATENCY_REQUESTS = 300
#: Requests of the untimed round that warms up and sizes each throughput variant.
WARMUP_REQUESTS = 200
_MIN_REQUESTS, _MAX_REQUESTS = 1000, 12_000
#: Seconds a serving process may take to start (it imports torch).
_FACTORY = "infeed.training.models:mlp_784"


def _url(backend: Backend, url: str | None, workdir: Path, run_id: str) -> str:
    if backend.scheme == "sqlite":
        return f"sqlite:///{workdir / run_id}.db"
    if backend.scheme == "kafka" and url:
        return url + ("&" if "?" in url else "?") + "linger_s=0"
    return url or "memory://"


def _publish_model(registry: ModelRegistry, name: str) -> None:
    import torch

    from infeed.training.models import mlp_784

    torch.manual_seed(0)
    registry.publish(name, mlp_784(), version=1, factory=_FACTORY)


# -- figure 4 ---------------------------------------------------------------------------------------


def _requests(name: str, reply_to: str, x: np.ndarray[Any, Any], n: int, tag: str) -> list[bytes]:
    deadline = time.time() + 3600.0  # a backlog that must not expire while it waits
    return [
        encode_request(
            Request(
                request_id=f"{tag}{i}",
                reply_to=reply_to,
                deadline=deadline,
                priority=0,
                model=name,
                model_version=None,
                inputs={"x": x[i % len(x)][None]},
            )
        )
        for i in range(n)
    ]


def _drain(broker: Broker, registry: ModelRegistry, size: int, n: int, x: np.ndarray[Any, Any]) -> float:
    """Publish ``n`` requests, then time one worker answering them all; return requests/s."""
    name = f"bench-{uuid.uuid4().hex[:12]}"
    _publish_model(registry, name)
    topic, reply_to = request_topic(name, 0), f"bench.replies.{name}"
    broker.create_topic(topic, partitions=1)
    broker.create_topic(reply_to, partitions=1)
    replies = broker.subscribe(reply_to, group="bench", start="earliest")
    worker = Worker(broker, registry, name, config=worker_config(DEFAULT_MAX_WAIT_S, size))
    try:
        # One request first, untimed: the consumer joins its group (Kafka rebalances) off the clock.
        broker.publish_many(topic, _requests(name, reply_to, x, 1, "warm"))
        while not worker.run_once(timeout_s=RECEIVE_TIMEOUT_S):
            raise BenchError(f"the worker answered no warm-up request within {RECEIVE_TIMEOUT_S} s")
        for chunk in batched(_requests(name, reply_to, x, n, "r"), 500):
            broker.publish_many(topic, chunk)
        answered = 0
        start = time.perf_counter()
        while answered < n:
            got = worker.run_once(timeout_s=RECEIVE_TIMEOUT_S)
            if not got:
                raise BenchError(f"the worker answered {answered} of {n} requests, then nothing")
            answered += got
        seconds = time.perf_counter() - start
    finally:
        worker.close()
    seen: set[str] = set()
    while len(seen) < n + 1:
        deliveries = replies.receive(max_messages=500, timeout_s=RECEIVE_TIMEOUT_S)
        if not deliveries:
            break
        for d in deliveries:
            reply = decode_reply(d.payload)
            if reply.error is not None:
                raise BenchError(f"request {reply.request_id} failed: {reply.error.message}")
            seen.add(reply.request_id)
        replies.ack(deliveries)
    replies.close()
    expect(len(seen), n + 1, f"replies to max_batch_size={size}")
    for t in (topic, reply_to):
        with contextlib.suppress(Exception):
            broker.delete_topic(t)
    return n / seconds


def _model_rate(size: int, seconds: float) -> float:
    """Rows/s of mlp-784 called in-process on a ready tensor of ``size`` rows."""
    import torch

    from infeed.training.models import mlp_784

    torch.manual_seed(0)
    model = mlp_784().eval()
    x = torch.rand(size, 784)
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(20):
                model(x)
            calls += 20
    return calls * size / elapsed


def _throughput(
    broker: Broker,
    registry: ModelRegistry,
    sizes: Sequence[int],
    requests: int | None,
    seconds: float,
    repetitions: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    x = np.random.default_rng(784).random((1024, 784), dtype=np.float32)
    counts: dict[int, int] = {}
    for size in sizes:
        warm = min(WARMUP_REQUESTS, requests or WARMUP_REQUESTS)
        rate = _drain(broker, registry, size, warm, x)
        counts[size] = requests or int(min(_MAX_REQUESTS, max(_MIN_REQUESTS, rate * seconds)))
    say("  throughput: " + ", ".join(f"batch {s}: {counts[s]:,} requests" for s in sizes))
    queue: dict[int, list[float]] = {s: [] for s in sizes}
    model: dict[int, list[float]] = {s: [] for s in sizes}
    for rep in range(repetitions):
        order = list(sizes) if rep % 2 == 0 else list(reversed(sizes))
        for size in order:
            queue[size].append(_drain(broker, registry, size, counts[size], x))
            model[size].append(_model_rate(size, min(0.3, seconds)))
    out: dict[str, Any] = {"sizes": {}, "speedup_vs_batch1": {}}
    for size in sizes:
        fraction = harness.paired_ratios(queue[size], model[size])
        out["sizes"][str(size)] = {
            "requests": counts[size],
            "requests_per_s": {"reps": queue[size], **harness.summarize(queue[size])},
            "model_rows_per_s": {"reps": model[size], **harness.summarize(model[size])},
            "fraction_of_model": {"reps": fraction, **harness.summarize(fraction)},
        }
        if size != sizes[0]:
            speedup = harness.paired_ratios(queue[size], queue[sizes[0]])
            out["speedup_vs_batch1"][str(size)] = {"reps": speedup, **harness.summarize(speedup)}
    return out


# -- figure 5 ---------------------------------------------------------------------------------------


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def _latency(
    backend: Backend,
    url: str,
    broker: Broker,
    registry: ModelRegistry,
    workdir: Path,
    requests: int,
    repetitions: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    x = np.random.default_rng(5).random((1, 784), dtype=np.float32)
    waits = {"infeed": 0.0, f"infeed max_wait_s={DEFAULT_MAX_WAIT_S:g}": DEFAULT_MAX_WAIT_S}
    servers: list[Server] = []
    calls: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    try:
        for variant, wait_s in waits.items():
            name = f"bench-lat-{uuid.uuid4().hex[:10]}"
            _publish_model(registry, name)
            broker.create_topic(request_topic(name, 0), partitions=1)
            if backend.embedded and backend.scheme == "memory":
                servers.append(Server.in_thread(broker, str(registry.root), name, wait_s))
            else:
                args = ["infeed", url, str(registry.root), name, repr(wait_s)]
                servers.append(Server(args, workdir / f"{name}.log"))
            client = Client(broker, name)
            closers.append(client.close)
            calls[variant] = functools.partial(client.predict, x, timeout_s=RECEIVE_TIMEOUT_S)
        if backend.name in ENGINES:
            channel = f"bench-raw-{uuid.uuid4().hex[:10]}"
            raw_url = str(workdir / f"{channel}.db") if backend.name == "sqlite" else url.split("?")[0]
            servers.append(Server(["raw", backend.name, raw_url, channel], workdir / f"{channel}.log"))
            requester = raw_echo(backend.name, raw_url, channel)
            closers.append(requester.close)
            calls["raw"] = functools.partial(requester.request, x.tobytes(), RECEIVE_TIMEOUT_S)
        for server in servers:
            server.wait_ready()
        for call in calls.values():  # untimed: first receives, group joins, caches
            for _ in range(min(30, requests)):
                call()
        say(f"  latency: {requests} sequential requests per round: {', '.join(calls)}")
        stats: dict[str, dict[str, list[float]]] = {v: {"p50": [], "p99": []} for v in calls}
        for rep in range(repetitions):
            order = list(calls) if rep % 2 == 0 else list(reversed(calls))
            for variant in order:
                call, latencies = calls[variant], []
                for _ in range(requests):
                    start = time.perf_counter()
                    call()
                    latencies.append(time.perf_counter() - start)
                p50, p99 = _percentiles(latencies)
                stats[variant]["p50"].append(p50)
                stats[variant]["p99"].append(p99)
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        for server in servers:
            server.close()
    out: dict[str, Any] = {"variants": {}, "raw": "raw" in stats}
    for variant, s in stats.items():
        row: dict[str, Any] = {q: {"reps": s[q], **harness.summarize(s[q])} for q in ("p50", "p99")}
        if variant != "raw" and "raw" in stats:
            for q in ("p50", "p99"):
                added = [a - b for a, b in zip(s[q], stats["raw"][q], strict=True)]
                row[f"{q}_added"] = {"reps": added, **harness.summarize(added)}
        out["variants"][variant] = row
    return out


# -- the run ----------------------------------------------------------------------------------------


def run(
    *,
    backends: Sequence[str] | None = None,
    sizes: Sequence[int] = SIZES,
    requests: int | None = None,
    seconds: float = DEFAULT_SECONDS,
    latency_requests: int = DEFAULT_LATENCY_REQUESTS,
    repetitions: int = harness.DEFAULT_REPETITIONS,
    out_dir: Path = harness.DEFAULT_OUT_DIR,
    brokers_file: Path = DEFAULT_BROKERS_FILE,
    console: Console | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Measure figures 4 and 5; write ``infer.json`` (and PNGs) to ``out_dir``; print the tables.

    Args:
        backends: only these backends (default: memory, sqlite and every real broker that is up).
        sizes: ``max_batch_size`` values of figure 4; the first is the baseline (normally 1).
        requests: requests per throughput round (default: sized to ``seconds``).
        seconds: target seconds of a throughput round.
        latency_requests: sequential requests per latency round.
        repetitions: rounds of each measurement (BENCHMARKS.md wants at least 3).
        out_dir: where the JSON and PNGs go.
        brokers_file: the state file of scripts/brokers.
        console: where tables and progress go.
        plot: also write the PNGs.

    Returns:
        What was written to ``infer.json``.

    Raises:
        ValueError: an unknown backend or a bad count.
    """
    if repetitions < 1 or latency_requests < 1 or (requests is not None and requests < 1):
        raise ValueError(
            f"repetitions, latency_requests and requests must be >= 1, got "
            f"{repetitions}, {latency_requests} and {requests}"
        )
    if len(sizes) < 2 or any(type(s) is not int or s < 1 for s in sizes):
        raise ValueError(f"sizes must be two or more ints >= 1 (the first the baseline), got {list(sizes)}")
    import torch

    console = console or harness.wide_console()
    chosen, skipped = discover(backends, brokers_file)
    for skip in skipped:
        console.print(f"[yellow]skip[/] {skip['backend']}: {skip['reason']}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    info = harness.machine_info(("torch", "numpy", "redis", "confluent-kafka"))
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="infeed-bench-infer-") as tmp:
            workdir = Path(tmp)
            for backend, url in chosen:
                run_id = uuid.uuid4().hex[:8]
                full = _url(backend, url, workdir, run_id)
                console.print(f"[bold]{backend.name}[/] ({full})")
                registry = ModelRegistry(workdir / f"models-{run_id}")
                try:
                    with connect(full) as broker:
                        results[backend.name] = {
                            "url": full,
                            "throughput": _throughput(
                                broker, registry, sizes, requests, seconds, repetitions, console.print
                            ),
                            "latency": _latency(
                                backend,
                                full,
                                broker,
                                registry,
                                workdir,
                                latency_requests,
                                repetitions,
                                console.print,
                            ),
                        }
                except Exception as exc:  # one broken backend must not cost the others' numbers
                    reason = f"failed: {type(exc).__name__}: {exc}"
                    console.print(f"[red]skip[/] {backend.name}: {reason}")
                    skipped.append({"backend": backend.name, "reason": reason})
    finally:
        torch.set_num_threads(threads)
    info["load_average_end"] = harness.load_average()
    data = {
        "figure": "infer",
        "title": "Inference: mlp-784 / req-784 throughput with dynamic batching (4), latency overhead (5)",
        "targets": TARGETS,
        "method": {
            "model": "mlp-784: Linear 784-256-ReLU-256-ReLU-10, eval, torch.inference_mode, 1 torch thread",
            "request": "req-784: one x float32 (1, 784), infeed msgpack request protocol",
            "throughput": "a backlog published before the clock; one Worker in the bench process drains it "
            f"(max_wait_s={DEFAULT_MAX_WAIT_S:g}); every reply read back untimed; "
            "ratios paired per repetition",
            "model_rows_per_s": "mlp-784 forward on a ready tensor of the same batch size, in-process",
            "latency": "one Client, sequential predict() against a Worker in its own process; raw: the "
            "engine's own client, a responder process running the same model on the same bytes",
            "kafka": "linger_s=0 on infeed and linger.ms=0 on the raw producer",
            "repetitions": repetitions,
            "latency_requests": latency_requests,
            "order": "variants alternate direction each repetition",
        },
        "machine": info,
        "skipped": skipped,
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    harness.write_json(out_dir / "infer.json", data)
    print_tables(data, console)
    pngs = draw(data, out_dir) if plot and results else []
    console.print("wrote " + ", ".join(str(p) for p in [out_dir / "infer.json", *pngs]))
    return data


def cli(
    backend: Annotated[
        list[str] | None, typer.Option("--backend", "-b", help="Only this backend (repeatable).")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--requests", "-n", min=1, help="Requests per throughput round.")
    ] = None,
    seconds: Annotated[float, typer.Option(min=0.05, help="Target seconds of a throughput round.")] = (
        DEFAULT_SECONDS
    ),
    latency_requests: Annotated[int, typer.Option(min=1, help="Sequential requests per latency round.")] = (
        DEFAULT_LATENCY_REQUESTS
    ),
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Rounds of each.")] = (
        harness.DEFAULT_REPETITIONS
    ),
    out: Annotated[Path, typer.Option("--out", help="Folder for the JSON and PNG results.")] = (
        harness.DEFAULT_OUT_DIR
    ),
    brokers_file: Annotated[Path, typer.Option("--brokers-file", help="State file of scripts/brokers.")] = (
        DEFAULT_BROKERS_FILE
    ),
) -> None:
    """Figures 4 and 5: req-784 throughput with batching ÷ without; latency added over the raw client."""
    try:
        run(
            backends=backend,
            requests=requests,
            seconds=seconds,
            latency_requests=latency_requests,
            repetitions=repetitions,
            out_dir=out,
            brokers_file=brokers_file,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
