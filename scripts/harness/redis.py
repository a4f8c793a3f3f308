"""Redis from the Debian package: one redis-server on 127.0.0.1, AOF on (fsync always).

Durable on purpose: the reconnect tests kill it with SIGKILL and start it again on the same port
and data dir (``restart``), and expect what was acknowledged before the kill to still be there.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from . import core

NAME = "redis"
DEADLINE_S = 30.0


def _ping(port: int) -> bool:
    """True once the server answers PING with PONG (not -LOADING while it replays the AOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64).startswith(b"+PONG")


def _launch(port: int, workdir: Path) -> core.Started:
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    log = workdir / "redis.log"
    cmd = [
        "redis-server",
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--daemonize", "no",
        "--logfile", "",  # stdout, which spawn sends to the log
    ]  # fmt: skip
    proc = core.spawn(cmd, log=log, cwd=workdir)
    try:
        core.wait_ready(NAME, lambda: _ping(port), deadline_s=DEADLINE_S, log=log, proc=proc)
    except BaseException:
        core.kill_hard([proc.pid])
        raise
    return core.Started(
        urls={"url": f"redis://127.0.0.1:{port}/0"},
        pids=[proc.pid],
        workdir=str(workdir),
        log=str(log),
        extra={"port": port},
    )


def start() -> core.Started:
    core.ensure_apt(["redis-server"], ["redis-server"])
    (port,) = core.free_ports(1)
    workdir = core.make_workdir(NAME)
    try:
        return _launch(port, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def restart(state: dict[str, Any]) -> core.Started:
    """Kill what is left of the server (SIGKILL), then start again on the same port and data."""
    port = int(state["extra"]["port"])
    core.kill_hard([int(p) for p in state["pids"]])
    core.wait_port_free(port)
    return _launch(port, Path(state["workdir"]))
