"""NATS with JetStream from the Debian package: one nats-server on 127.0.0.1.

JetStream's store lives under the workdir, so ``restart`` (after a SIGKILL) finds its streams and
consumers again on the same client and monitoring ports.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path
from typing import Any

from . import core

NAME = "nats"
DEADLINE_S = 30.0

# never through a proxy from the environment: the server is on loopback
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(monitor_port: int) -> bool:
    url = f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"
    with _opener.open(url, timeout=1.0) as resp:
        return bool(resp.status == 200)


def _launch(port: int, monitor_port: int, workdir: Path) -> core.Started:
    store = workdir / "jetstream"
    store.mkdir(exist_ok=True)
    log = workdir / "nats.log"
    cmd = [
        "nats-server",
        "-a", "127.0.0.1",
        "-p", str(port),
        "-m", str(monitor_port),
        "-n", f"infeed-{port}",
        "-js",
        "-sd", str(store),
    ]  # fmt: skip
    proc = core.spawn(cmd, log=log, cwd=workdir)
    try:
        core.wait_ready(NAME, lambda: _healthy(monitor_port), deadline_s=DEADLINE_S, log=log, proc=proc)
    except BaseException:
        core.kill_hard([proc.pid])
        raise
    return core.Started(
        urls={"url": f"nats://127.0.0.1:{port}", "monitor": f"http://127.0.0.1:{monitor_port}"},
        pids=[proc.pid],
        workdir=str(workdir),
        log=str(log),
        extra={"port": port, "monitor_port": monitor_port},
    )


def start() -> core.Started:
    core.ensure_apt(["nats-server"], ["nats-server"])
    port, monitor_port = core.free_ports(2)
    workdir = core.make_workdir(NAME)
    try:
        return _launch(port, monitor_port, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def restart(state: dict[str, Any]) -> core.Started:
    """Kill what is left of the server (SIGKILL), then start again on the same ports and store."""
    port = int(state["extra"]["port"])
    monitor_port = int(state["extra"]["monitor_port"])
    core.kill_hard([int(p) for p in state["pids"]])
    core.wait_port_free(port)
    core.wait_port_free(monitor_port)
    return _launch(port, monitor_port, Path(state["workdir"]))
