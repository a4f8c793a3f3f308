"""One inference worker process of ``infeed demo``: ``python -m infeed.cli._demo_worker URL REGISTRY MODEL``.

Serves ``MODEL`` from the registry folder over the broker at ``URL``, following the model-events
topic so new versions are loaded beside the current one and swapped in between batches. It writes
``ready`` on stdout once it listens, and stops (leaving its group, giving back what it holds) on
SIGTERM or SIGINT, or when the process that started it is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

__all__ = ["DEMO_BATCH_SIZE", "DEMO_MAX_WAIT_S", "main"]

#: Requests per model call, at most.
DEMO_BATCH_SIZE = 32
#: How long a batch waits for more requests after its first one.
DEMO_MAX_WAIT_S = 0.002
#: How often the loop looks at the stop flag and the parent process.
_POLL_S = 0.2


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until stopped; return the exit status.

    Args:
        argv: ``URL REGISTRY MODEL`` (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m infeed.cli._demo_worker URL REGISTRY MODEL", file=sys.stderr)
        return 2
    url, root, model = args
    parent = os.getppid()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())

    from infeed.brokers import connect
    from infeed.inference import BatchConfig, ModelRegistry, Worker, WorkerConfig

    config = WorkerConfig(
        batch=BatchConfig(max_batch_size=DEMO_BATCH_SIZE, max_wait_s=DEMO_MAX_WAIT_S), priorities=1
    )
    print(f"worker pid {os.getpid()} serving {model} from {root}", file=sys.stderr, flush=True)
    with connect(url) as broker, Worker(broker, ModelRegistry(root), model, config=config) as worker:
        print("ready", flush=True)
        while not stop.is_set() and os.getppid() == parent:
            worker.run_once(timeout_s=_POLL_S)
        print(f"worker pid {os.getpid()} answered {worker.answered} requests", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
