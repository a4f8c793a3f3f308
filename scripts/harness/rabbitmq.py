"""RabbitMQ from the Debian package (3.10, Erlang 25): one node on 127.0.0.1, run as root.

The Debian wrapper ``/usr/sbin/rabbitmq-server`` switches to the ``rabbitmq`` user, so we run
``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly with every path (HOME for the Erlang cookie,
mnesia, logs, config, plugins, env file) under the workdir. Erlang starts an ``epmd`` daemon on
our own ERL_EPMD_PORT; it leaves our process session, so its PID is found by its listening port
and recorded as the last PID (stopped after the node).

Stream queues (``x-queue-type: stream``) are part of the core ``rabbit`` app in 3.10, so AMQP
0-9-1 clients can use them with no plugin; ``rabbitmq_stream`` is only the binary stream
protocol. Extra plugins can be named in INFEED_RABBITMQ_PLUGINS (comma separated).

Boot takes ~10 s cold and longer after a SIGKILL (the message store rebuilds its index).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Any

from . import core

NAME = "rabbitmq"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
DEADLINE_S = 90.0
RESTART_DEADLINE_S = 150.0


# --- readiness: an AMQP 0-9-1 handshake with the standard library ---------------------------


def _shortstr(s: bytes) -> bytes:
    return bytes([len(s)]) + s


def _longstr(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


def _frame(channel: int, class_id: int, method_id: int, args: bytes) -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by server")
        buf += chunk
    return buf


def _expect(s: socket.socket, class_id: int, method_id: int) -> bytes:
    """Read frames until a method frame arrives; it must be ``class_id.method_id``."""
    while True:
        ftype, _channel, size = struct.unpack(">BHI", _recv_exact(s, 7))
        payload = _recv_exact(s, size + 1)[:-1]
        if ftype == 8:  # heartbeat
            continue
        if ftype != 1:
            raise ConnectionError(f"unexpected frame type {ftype}")
        got = struct.unpack(">HH", payload[:4])
        if got != (class_id, method_id):
            raise ConnectionError(f"expected method {class_id}.{method_id}, got {got[0]}.{got[1]}")
        return payload[4:]


def _amqp_open(port: int, user: str, password: str, timeout: float) -> socket.socket:
    """Connect, log in, open vhost "/" and channel 1; return the socket."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        _expect(s, 10, 10)  # Connection.Start
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        s.sendall(
            _frame(
                0,
                10,
                11,
                struct.pack(">I", 0) + _shortstr(b"PLAIN") + _longstr(response) + _shortstr(b"en_US"),
            )
        )
        tune = _expect(s, 10, 30)  # Connection.Tune
        channel_max, frame_max, _heartbeat = struct.unpack(">HIH", tune[:8])
        s.sendall(_frame(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))
        s.sendall(_frame(0, 10, 40, _shortstr(b"/") + _shortstr(b"") + b"\x00"))  # Connection.Open
        _expect(s, 10, 41)
        s.sendall(_frame(1, 20, 10, _shortstr(b"")))  # Channel.Open
        _expect(s, 20, 11)
        return s
    except BaseException:
        s.close()
        raise


def _amqp_close(s: socket.socket) -> None:
    with s:
        s.sendall(_frame(0, 10, 50, struct.pack(">H", 200) + _shortstr(b"bye") + struct.pack(">HH", 0, 0)))
        try:
            _expect(s, 10, 51)  # Connection.Close-Ok
        except (OSError, ConnectionError):
            pass


def amqp_handshake(port: int, *, user: str = "guest", password: str = "guest", timeout: float = 3.0) -> bool:
    """Log in as guest, open vhost "/" and a channel, then close: True when all of it works."""
    _amqp_close(_amqp_open(port, user, password, timeout))
    return True


def _warm_stream_coordinator(port: int, names_file: Path, timeout: float = 30.0) -> None:
    """Declare and delete a stream queue so the stream coordinator (a Ra server) exists on disk.

    Ra records the coordinator's name in ``names_file`` (DETS, whose delayed write keeps a new
    record in memory for up to 3 s); a node SIGKILLed before the record reaches the file comes
    back with the coordinator unknown and every stream "down or inaccessible" for good. Doing it
    here, and waiting until the name is in the file, closes the gap before any test runs.
    """
    name = b"infeed.harness.warmup"
    s = _amqp_open(port, "guest", "guest", timeout)
    try:
        args = _shortstr(b"x-queue-type") + b"S" + _longstr(b"stream")
        table = struct.pack(">I", len(args)) + args
        s.sendall(_frame(1, 50, 10, struct.pack(">H", 0) + _shortstr(name) + b"\x02" + table))  # durable
        _expect(s, 50, 11)  # Queue.Declare-Ok
        s.sendall(_frame(1, 50, 40, struct.pack(">H", 0) + _shortstr(name) + b"\x00"))
        _expect(s, 50, 41)  # Queue.Delete-Ok
    finally:
        _amqp_close(s)
    end = time.monotonic() + timeout
    while b"rabbit_stream_coordinator" not in _read(names_file):
        if time.monotonic() > end:
            raise ConnectionError(f"the stream coordinator is not recorded in {names_file} after {timeout}s")
        time.sleep(0.1)  # DETS writes on its own timer; there is nothing to wait on


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


# --- epmd ---------------------------------------------------------------------------------------


def pid_listening_on(port: int) -> int | None:
    """PID of the process listening on TCP ``port`` (from /proc, no external tools)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
            except OSError:
                continue
    return None


def _epmd_pid(epmd_port: int, log: Path) -> int:
    end = time.monotonic() + 10.0
    while time.monotonic() < end:
        pid = pid_listening_on(epmd_port)
        if pid is not None:
            return pid
        time.sleep(0.1)
    raise core.HarnessError(f"rabbitmq is up but no epmd listens on {epmd_port}:\n{core.log_tail(log)}")


# --- start / restart / stop ---------------------------------------------------------------------


def _env(workdir: Path, port: int, dist_port: int, epmd_port: int) -> dict[str, str]:
    home = workdir / "home"
    return {
        "HOME": str(home),
        "RABBITMQ_NODENAME": f"infeed-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "logs"),
        "RABBITMQ_LOGS": "-",  # log to stdout, which spawn sends to the log file
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
        "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_CRASH_DUMP": str(workdir / "erl_crash.dump"),
    }


def _prepare(workdir: Path) -> None:
    for sub in ("home", "mnesia", "logs"):
        (workdir / sub).mkdir(exist_ok=True)
    plugins = [p.strip() for p in os.environ.get("INFEED_RABBITMQ_PLUGINS", "").split(",") if p.strip()]
    (workdir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
    (workdir / "rabbitmq.conf").write_text(
        "loopback_users = none\n"
        "disk_free_limit.absolute = 50MB\n"
        "log.console = true\n"
        "log.console.level = info\n"
        "log.file = false\n"
    )
    (workdir / "rabbitmq-env.conf").write_text("")


def _launch(ports: dict[str, int], workdir: Path, deadline_s: float, *, warm: bool = False) -> core.Started:
    port, dist_port, epmd_port = ports["port"], ports["dist_port"], ports["epmd_port"]
    log = workdir / "rabbitmq.log"
    env = _env(workdir, port, dist_port, epmd_port)
    proc = core.spawn([SERVER], log=log, env=env, cwd=workdir)
    try:
        core.wait_ready(
            NAME, lambda: amqp_handshake(port), deadline_s=deadline_s, log=log, proc=proc, interval_s=0.5
        )
        epmd = _epmd_pid(epmd_port, log)
        if warm:
            node = env["RABBITMQ_NODENAME"]
            names = workdir / "mnesia" / node / "coordination" / node / "names.dets"
            try:
                _warm_stream_coordinator(port, names)
            except (OSError, ConnectionError) as exc:
                raise core.HarnessError(
                    f"rabbitmq is up but declaring a stream queue failed: {exc}\n{core.log_tail(log)}"
                ) from exc
    except BaseException:
        core.kill_hard([proc.pid])
        raise
    return core.Started(
        urls={"url": f"amqp://guest:guest@127.0.0.1:{port}/%2F"},
        pids=[proc.pid, epmd],
        workdir=str(workdir),
        log=str(log),
        extra={
            **ports,
            "node": env["RABBITMQ_NODENAME"],
            "epmd_pid": epmd,
            # what rabbitmqctl / rabbitmq-diagnostics need to reach the node (plus -n node)
            "cli_env": {k: env[k] for k in ("HOME", "ERL_EPMD_PORT", "RABBITMQ_NODENAME")},
        },
    )


def start() -> core.Started:
    core.ensure_apt(["rabbitmq-server"], [SERVER])
    port, dist_port, epmd_port = core.free_ports(3)
    workdir = core.make_workdir(NAME)
    try:
        _prepare(workdir)
        ports = {"port": port, "dist_port": dist_port, "epmd_port": epmd_port}
        return _launch(ports, workdir, DEADLINE_S, warm=True)
    except BaseException:
        epmd = pid_listening_on(epmd_port)
        if epmd is not None:
            core.stop_pids([epmd], grace_s=2.0)
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _node_pids(state: dict[str, Any]) -> list[int]:
    epmd = state.get("extra", {}).get("epmd_pid")
    return [int(p) for p in state["pids"] if p != epmd]


def kill(state: dict[str, Any]) -> None:
    """Crash the node: SIGKILL its process group. epmd stays up, as a system daemon would."""
    core.kill_hard(_node_pids(state))


def restart(state: dict[str, Any]) -> core.Started:
    """Kill what is left of the node (SIGKILL), then start again on the same ports and data."""
    extra = state["extra"]
    ports = {k: int(extra[k]) for k in ("port", "dist_port", "epmd_port")}
    kill(state)
    core.wait_port_free(ports["port"])
    core.wait_port_free(ports["dist_port"])
    return _launch(ports, Path(state["workdir"]), RESTART_DEADLINE_S)


def stop(state: dict[str, Any]) -> None:
    """Stop the node first (SIGTERM, graceful), then its epmd."""
    core.stop_pids(_node_pids(state), grace_s=20.0)
    epmd = state.get("extra", {}).get("epmd_pid")
    if epmd:
        core.stop_pids([int(epmd)], grace_s=2.0)
