"""Mosquitto (MQTT) from the Debian package: one broker on 127.0.0.1, no persistence.

``set_tcp_nodelay true`` matters: without it (and TCP_NODELAY on the client's socket) QoS 1
round trips stall 44-88 ms on delayed ACKs. ``user root`` keeps it from dropping to the
``mosquitto`` user, which could not write into a root-owned workdir.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from . import core

NAME = "mosquitto"
DEADLINE_S = 20.0

# MQTT 3.1.1 CONNECT, clean session, keepalive 60 s, client id "infeed-probe"
_CLIENT_ID = b"infeed-probe"
_VAR = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(_CLIENT_ID).to_bytes(2, "big") + _CLIENT_ID
_CONNECT = b"\x10" + bytes([len(_VAR)]) + _VAR
_DISCONNECT = b"\xe0\x00"


def _connack(port: int) -> bool:
    """True once an anonymous MQTT CONNECT is accepted (CONNACK, return code 0)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(_CONNECT)
        ack = b""
        while len(ack) < 4:
            chunk = s.recv(4 - len(ack))
            if not chunk:
                return False
            ack += chunk
        ok = ack[0] == 0x20 and ack[3] == 0
        s.sendall(_DISCONNECT)
        return ok


def _launch(port: int, workdir: Path) -> core.Started:
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "set_tcp_nodelay true",
                "user root",
                "log_dest stdout",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "connection_messages false",
                "",
            ]
        )
    )
    log = workdir / "mosquitto.log"
    proc = core.spawn(["mosquitto", "-c", str(conf)], log=log, cwd=workdir)
    try:
        core.wait_ready(NAME, lambda: _connack(port), deadline_s=DEADLINE_S, log=log, proc=proc)
    except BaseException:
        core.kill_hard([proc.pid])
        raise
    return core.Started(
        urls={"url": f"mqtt://127.0.0.1:{port}"},
        pids=[proc.pid],
        workdir=str(workdir),
        log=str(log),
        extra={"port": port},
    )


def start() -> core.Started:
    core.ensure_apt(["mosquitto"], ["mosquitto"])
    (port,) = core.free_ports(1)
    workdir = core.make_workdir(NAME)
    try:
        return _launch(port, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def restart(state: dict[str, Any]) -> core.Started:
    """Kill what is left of the broker (SIGKILL), then start again on the same port."""
    port = int(state["extra"]["port"])
    core.kill_hard([int(p) for p in state["pids"]])
    core.wait_port_free(port)
    return _launch(port, Path(state["workdir"]))
