"""``infeed serve`` (N worker processes for one model) and ``infeed predict`` (one request)."""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from infeed.cli._shared import BrokerOption, err, fail, state

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.synchronize import Event

    import numpy as np

__all__ = ["predict", "serve"]

#: Seconds between checks of the worker processes (restart the ones that died).
_SUPERVISE_S = 0.5


def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="The model's name in the registry.")],
    registry_dir: Annotated[Path, typer.Option(help="The model registry folder.")],
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Rows per model call, at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="How long a batch waits to fill.")] = 5.0,
    min_time_left_ms: Annotated[
        float, typer.Option(min=0.0, help="Treat requests with less time left than this as expired.")
    ] = 0.0,
    priorities: Annotated[int, typer.Option(min=1, max=10, help="Priority levels served.")] = 3,
    events_topic: Annotated[
        str, typer.Option(help="Where new versions are announced.")
    ] = "infeed.model-events",
    follow: Annotated[bool, typer.Option(help="Load announced versions (hot reload).")] = True,
    threads: Annotated[int, typer.Option(min=1, help="torch threads per worker.")] = 1,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (+i for worker i).")
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Serve a model from its request topics: batched, deadline-aware, replies before acks.

    With --workers N, N processes share the work (one consumer group); one that dies is started
    again, and its unacked requests go to the others once their lease runs out. Ctrl-C or SIGTERM
    stops after the current batches.
    """
    if not (registry_dir / model).is_dir():
        raise fail(f"no model {model!r} in registry {registry_dir}; publish a version first")
    url = state(ctx).settings(broker).broker
    options: dict[str, Any] = {
        "url": url,
        "registry_dir": str(registry_dir),
        "model": model,
        "max_batch_size": max_batch_size,
        "max_wait_s": max_wait_ms / 1000.0,
        "min_time_left_s": min_time_left_ms / 1000.0,
        "priorities": priorities,
        "events_topic": events_topic if follow else None,
        "threads": threads,
        "metrics_port": metrics_port,
    }
    if workers == 1:
        import threading

        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        _run_worker(options, 0, stop)
        return
    _supervise(options, workers)


def _run_worker(options: dict[str, Any], index: int, stop: Any) -> None:
    from prometheus_client import start_http_server

    from infeed.brokers import connect
    from infeed.inference import BatchConfig, InferenceMetrics, ModelRegistry, Worker, WorkerConfig

    config = WorkerConfig(
        batch=BatchConfig(
            max_batch_size=options["max_batch_size"],
            max_wait_s=options["max_wait_s"],
            min_time_left_s=options["min_time_left_s"],
        ),
        priorities=options["priorities"],
        events_topic=options["events_topic"],
        torch_threads=options["threads"],
    )
    metrics = InferenceMetrics()
    if options["metrics_port"] is not None:
        start_http_server(options["metrics_port"] + index, registry=metrics.registry)
    with connect(options["url"]) as broker:
        registry = ModelRegistry(options["registry_dir"])
        try:
            worker = Worker(broker, registry, options["model"], config=config, middleware=[metrics])
        except LookupError as exc:
            raise fail(str(exc)) from exc
        with worker:
            err().print(f"worker {index} serving {options['model']} version {worker.models.current}")
            worker.run(stop)


def _child(options: dict[str, Any], index: int, stop: Event) -> None:
    import os
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
    parent = os.getppid()

    def orphaned() -> None:  # a parent killed with SIGKILL cannot say stop: notice it is gone
        while not stop.wait(_SUPERVISE_S):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        _run_worker(options, index, stop)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


def _supervise(options: dict[str, Any], count: int) -> None:
    ctx = multiprocessing.get_context("spawn")  # no torch state or broker connections forked
    stop = ctx.Event()
    stopping: list[int] = []  # a signal handler must not take the Event's lock: a plain flag
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: stopping.append(signum))

    def start(i: int) -> SpawnProcess:
        process = ctx.Process(target=_child, args=(options, i, stop), name=f"infeed-worker-{i}")
        process.start()
        return process

    processes = [start(i) for i in range(count)]
    while not stopping:
        time.sleep(_SUPERVISE_S)
        for i, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                err().print(
                    f"worker {i} (pid {process.pid}) exited with {process.exitcode}; starting it again"
                )
                processes[i] = start(i)
    stop.set()
    for process in processes:
        process.join()


def _read_inputs(text: str, name: str, dtype: str) -> dict[str, np.ndarray]:
    import numpy as np

    path = Path(text)
    if text.endswith(".npy") and path.is_file():
        return {name: np.load(path, allow_pickle=False)}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise fail(f"--input is neither a .npy file nor JSON: {exc}") from exc
    items = value.items() if isinstance(value, dict) else [(name, value)]
    try:
        return {str(k): np.atleast_2d(np.asarray(v, dtype=dtype)) for k, v in items}
    except (TypeError, ValueError) as exc:
        raise fail(f"--input does not make {dtype} arrays: {exc}") from exc


def predict(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="The model's name.")],
    input_: Annotated[
        str,
        typer.Option(
            "--input",
            "-i",
            metavar="JSON|FILE.npy",
            help='A JSON array, a JSON object {"name": array}, or a .npy file.',
        ),
    ],
    input_name: Annotated[str, typer.Option(help="The input's name, for an array or .npy file.")] = "x",
    dtype: Annotated[str, typer.Option(help="dtype of JSON inputs.")] = "float32",
    timeout_s: Annotated[float, typer.Option(min=0.001, help="End-to-end timeout.")] = 10.0,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0 is the highest.")] = 0,
    version: Annotated[int | None, typer.Option(min=0, help="Pin this model version.")] = None,
    broker: BrokerOption = None,
) -> None:
    """Send one request to a served model and print the reply as JSON."""
    from infeed.errors import InferenceError, QueueFull
    from infeed.inference import Client

    inputs = _read_inputs(input_, input_name, dtype)
    with state(ctx).connect(broker) as connection, Client(connection, model) as client:
        try:
            reply = client.submit(
                inputs, timeout_s=timeout_s, priority=priority, model_version=version
            ).result()
        except (InferenceError, QueueFull) as exc:
            raise fail(str(exc)) from exc
        except ValueError as exc:
            raise fail(f"invalid request: {exc}") from exc
    record = {
        "model": reply.model,
        "model_version": reply.model_version,
        "outputs": {k: v.tolist() for k, v in reply.outputs.items()},
    }
    typer.echo(json.dumps(record))
