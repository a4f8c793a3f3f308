"""Apache Kafka in KRaft mode from Maven Central: one combined node, or three for fault tests.

``start()`` runs one node that is both broker and controller (module name ``kafka``);
``start_cluster()`` runs three such nodes with a static quorum, replication factor 3 and
``min.insync.replicas=2`` (module name ``kafka3``, see ``kafka3.py``). ``kill_node`` and
``restart_node`` SIGKILL one cluster node and bring it back on the same data dir and ports.

Readiness is checked without any Kafka client library: the broker must answer a Kafka
``Metadata`` request on its PLAINTEXT listener (spoken here with ``struct``) listing every broker
of the cluster, which is what ``AdminClient.list_topics()`` waits for.
"""

from __future__ import annotations

import base64
import fcntl
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from . import _jvm, core

NAME = "kafka"
NAME3 = "kafka3"
POM = _jvm.JVM_DIR / "kafka-pom.xml"
#: A single node is up in ~10 s on 2 cores; leave room for a loaded CI machine.
START_DEADLINE_S = 120.0
#: Three JVMs start at once on 2 cores and must elect a controller first.
CLUSTER_DEADLINE_S = 240.0
FORMAT_TIMEOUT_S = 120.0

#: Settings of every node: small, quick, loopback only.
_COMMON: dict[str, object] = {
    "process.roles": "broker,controller",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "num.partitions": 1,
    "offsets.topic.num.partitions": 3,
    "transaction.state.log.num.partitions": 3,
    "share.coordinator.state.topic.num.partitions": 3,
    "group.initial.rebalance.delay.ms": 0,
    # the 128 MiB default runs a 512 MiB heap out of memory
    "log.cleaner.dedupe.buffer.size": 8388608,
    "auto.create.topics.enable": "true",
    "delete.topic.enable": "true",
    "num.network.threads": 2,
    "num.io.threads": 4,
    "num.recovery.threads.per.data.dir": 1,
    "log.retention.check.interval.ms": 60000,
}
_SINGLE: dict[str, object] = {
    "default.replication.factor": 1,
    "min.insync.replicas": 1,
    "offsets.topic.replication.factor": 1,
    "transaction.state.log.replication.factor": 1,
    "transaction.state.log.min.isr": 1,
    "share.coordinator.state.topic.replication.factor": 1,
    "share.coordinator.state.topic.min.isr": 1,
}
_CLUSTER: dict[str, object] = {
    "default.replication.factor": 3,
    "min.insync.replicas": 2,
    "offsets.topic.replication.factor": 3,
    "transaction.state.log.replication.factor": 3,
    "transaction.state.log.min.isr": 2,
    "share.coordinator.state.topic.replication.factor": 3,
    "share.coordinator.state.topic.min.isr": 2,
    "unclean.leader.election.enable": "false",
    # notice a killed node within seconds, not the 9 s / 30 s defaults
    "broker.session.timeout.ms": 4000,
    "broker.heartbeat.interval.ms": 1000,
    "replica.lag.time.max.ms": 5000,
}


def start() -> core.Started:
    """Start one combined broker+controller node; url ``kafka://127.0.0.1:PORT``."""
    return _start(NAME, 1, _SINGLE, START_DEADLINE_S)


def start_cluster() -> core.Started:
    """Start a three-node KRaft cluster; url ``kafka://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``.

    ``extra["nodes"]`` holds, per node, its ``node_id``, ``pid``, ``port``, ``controller_port``,
    ``dir``, ``config`` and ``log``; ``pids`` lists the three nodes in order.
    """
    return _start(NAME3, 3, _CLUSTER, CLUSTER_DEADLINE_S)


def restart(state: dict[str, Any]) -> core.Started:
    """SIGKILL what is left of every node, then start them all again on the same ports and data.

    The ``scripts/brokers restart`` hook, for ``kafka`` and ``kafka3`` alike; never reformats.
    """
    nodes = _nodes(state)
    core.kill_hard([int(nd["pid"]) for nd in nodes])
    for nd in nodes:
        core.wait_port_free(int(nd["port"]))
        core.wait_port_free(int(nd["controller_port"]))
    jars = Path(str(state["extra"]["jars"]))
    procs = [_spawn(jars, nd, restart=True) for nd in nodes]
    started = core.Started(
        urls=dict(state["urls"]),
        pids=[p.pid for p in procs],
        workdir=str(state["workdir"]),
        log=str(state["log"]),
        extra={k: v for k, v in state["extra"].items() if k != "start_seconds"},
    )
    deadline_s = CLUSTER_DEADLINE_S if len(nodes) > 1 else START_DEADLINE_S
    _wait(NAME3 if len(nodes) > 1 else NAME, nodes, procs, deadline_s, Path(started.workdir))
    return started


def kill_node(state: MutableMapping[str, Any], i: int) -> int:
    """SIGKILL node ``i`` (0-based index into ``extra["nodes"]``; its node.id is ``i + 1``).

    ``state`` is the broker's entry of the state file (``core.read_state()["kafka3"]``) or
    ``core.started_to_state(started)``. Returns the killed PID once the process is gone; the
    node's ports stay reserved in ``state`` for ``restart_node``.
    """
    pid = int(_nodes(state)[i]["pid"])
    core.kill_hard([pid])
    return pid


def restart_node(state: MutableMapping[str, Any], i: int, *, deadline_s: float = START_DEADLINE_S) -> int:
    """Start node ``i`` again on its data dir and ports and wait until it serves the cluster.

    SIGKILLs the node first if it still runs. Updates ``state`` in place (the node's ``pid`` and
    ``pids[i]``) and the state file's entry with the same workdir, if any, so that
    ``scripts/brokers stop`` stops the new process. Returns the new PID.
    """
    nodes = _nodes(state)
    node = nodes[i]
    core.kill_hard([int(node["pid"])])
    core.wait_port_free(int(node["port"]))
    core.wait_port_free(int(node["controller_port"]))
    proc = _spawn(Path(str(state["extra"]["jars"])), node, restart=True)
    pids = state.get("pids")
    if isinstance(pids, list) and len(pids) == len(nodes):
        pids[i] = proc.pid
    _persist(state)
    core.wait_ready(
        f"kafka node {node['node_id']}",
        _sees(int(node["port"]), len(nodes)),
        deadline_s=deadline_s,
        log=node["log"],
        proc=proc,
    )
    return proc.pid


def _start(name: str, n: int, overrides: Mapping[str, object], deadline_s: float) -> core.Started:
    jars = _jvm.fetch_jars(NAME, POM)
    work = core.make_workdir(name)
    ports = core.free_ports(2 * n)
    nodes: list[dict[str, Any]] = []
    for k in range(n):
        d = work / f"node{k + 1}"
        d.mkdir()
        nodes.append(
            {
                "node_id": k + 1,
                "port": ports[2 * k],
                "controller_port": ports[2 * k + 1],
                "dir": str(d),
                "config": str(d / "server.properties"),
                "log": str(work / f"node{k + 1}.log"),
            }
        )
    voters = ",".join(f"{nd['node_id']}@127.0.0.1:{nd['controller_port']}" for nd in nodes)
    for nd in nodes:
        props = {
            "node.id": nd["node_id"],
            "listeners": f"PLAINTEXT://127.0.0.1:{nd['port']},CONTROLLER://127.0.0.1:{nd['controller_port']}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{nd['port']}",
            "controller.quorum.voters": voters,
            "log.dirs": f"{nd['dir']}/data",
            **_COMMON,
            **overrides,
        }
        _jvm.write_properties(Path(nd["config"]), props)
    cluster_id = new_cluster_id()
    _format(jars, nodes, cluster_id)

    procs = [_spawn(jars, nd) for nd in nodes]
    bootstrap = ",".join(f"127.0.0.1:{nd['port']}" for nd in nodes)
    started = core.Started(
        urls={"url": f"kafka://{bootstrap}", "bootstrap": bootstrap},
        pids=[p.pid for p in procs],
        workdir=str(work),
        log=nodes[0]["log"],
        extra={"cluster_id": cluster_id, "jars": str(jars), "nodes": nodes},
    )
    _wait(name, nodes, procs, deadline_s, work)
    return started


def _spawn(jars: Path, node: dict[str, Any], *, restart: bool = False) -> subprocess.Popen[bytes]:
    log = Path(node["log"])
    if restart:
        with open(log, "ab") as out:
            out.write(f"\n===== harness: starting node {node['node_id']} again =====\n".encode())
    proc = core.spawn(_jvm.java_cmd(jars, "kafka.Kafka", [node["config"]]), log=log)
    node["pid"] = proc.pid
    return proc


def _wait(
    name: str,
    nodes: list[dict[str, Any]],
    procs: list[subprocess.Popen[bytes]],
    deadline_s: float,
    work: Path,
) -> None:
    """Wait until every node lists all of the cluster's brokers; on failure stop them and raise."""
    t0 = time.monotonic()
    try:
        for nd, p in zip(nodes, procs, strict=True):
            core.wait_ready(
                f"{name} node {nd['node_id']}",
                _sees(int(nd["port"]), len(nodes)),
                deadline_s=max(1.0, deadline_s - (time.monotonic() - t0)),
                log=nd["log"],
                proc=p,
            )
            # a sibling that died while we waited on this one would only show up as a timeout
            for other, q in zip(nodes, procs, strict=True):
                if q.poll() is not None:
                    tail = core.log_tail(other["log"])
                    raise core.HarnessError(
                        f"{name} node {other['node_id']} exited with {q.returncode}:\n{tail}"
                    )
    except BaseException as exc:
        core.kill_hard([p.pid for p in procs])
        if not isinstance(exc, core.HarnessError):
            raise
        tails = "".join(
            f"\n--- {nd['log']}\n{core.log_tail(nd['log'], 15)}" for nd in nodes if len(nodes) > 1
        )
        raise core.HarnessError(f"{exc}{tails}\n(data and logs kept in {work})") from None
    core.say(
        f"{name}: ready in {time.monotonic() - t0:.1f}s on ports {', '.join(str(nd['port']) for nd in nodes)}"
    )


def _sees(port: int, n: int) -> Callable[[], bool]:
    return lambda: _broker_count(port) >= n


def new_cluster_id() -> str:
    """22 base64url characters of a uuid4, never starting with ``-``.

    The storage tool's argument parser reads an id such as ``-x3...`` as an option and refuses to
    format (1 start in 64 failed so); Kafka's own ``Uuid.randomUuid`` skips such ids too.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format(jars: Path, nodes: list[dict[str, Any]], cluster_id: str) -> None:
    """Format each node's storage once (never on restart); static voters need no --standalone."""
    procs = []
    for nd in nodes:
        cmd = _jvm.java_cmd(
            jars,
            "kafka.tools.StorageTool",
            ["format", "-t", cluster_id, "-c", nd["config"], "--ignore-formatted"],
        )
        procs.append((nd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    for nd, p in procs:
        try:
            out, _ = p.communicate(timeout=FORMAT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        Path(nd["log"]).write_bytes(out or b"")
        if p.returncode != 0:
            tail = core.log_tail(nd["log"])
            raise core.HarnessError(
                f"kafka StorageTool format failed ({p.returncode}) for {nd['config']}:\n{tail}"
            )


def _nodes(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    extra = state.get("extra")
    nodes = extra.get("nodes") if isinstance(extra, Mapping) else None
    if not isinstance(nodes, list) or not nodes:
        raise core.HarnessError("not a kafka harness state: extra['nodes'] is missing")
    return nodes


def _persist(state: Mapping[str, Any]) -> None:
    """Copy new PIDs into the state file's entry with the same workdir (the CLI's lock protocol)."""
    if not core.STATE_FILE.exists():
        return
    with open(core.STATE_FILE.with_name(core.STATE_FILE.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        all_state = core.read_state()
        changed = False
        for entry in all_state.values():
            if isinstance(entry, dict) and entry.get("workdir") == state.get("workdir"):
                entry["pids"] = list(state["pids"])
                entry["extra"] = dict(state["extra"])
                changed = True
        if changed:
            core.write_state(all_state)


# --- the two Kafka protocol requests the readiness probe needs --------------------------------

_API_VERSIONS = 18
_METADATA = 3


def _broker_count(port: int, timeout_s: float = 3.0) -> int:
    """Number of brokers in the cluster metadata served on ``port`` (raises until it answers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        # ApiVersions v0 is answered by every broker version; pick a flexible Metadata version.
        body = _request(sock, _API_VERSIONS, 0, 1, b"", flexible=False)
        error, count = struct.unpack_from(">hi", body)
        if error:
            raise OSError(f"ApiVersions error {error}")
        entries = (struct.unpack_from(">hhh", body, 6 + 6 * j) for j in range(count))
        lo, hi = next((lo, hi) for key, lo, hi in entries if key == _METADATA)
        version = min(hi, 12)
        if version < max(lo, 9):
            raise OSError(f"broker speaks Metadata v{lo}-v{hi}, the probe needs v9-v12")
        # topics: empty compact array; allow_auto_topic_creation=false;
        # v9-v10 also include_cluster_authorized_operations; include_topic_authorized_operations
        req = b"\x01\x00" + (b"\x00" if version < 11 else b"") + b"\x00" + b"\x00"
        resp = _request(sock, _METADATA, version, 2, req, flexible=True)
        pos = _skip_tags(resp, 0)  # response header v1 tagged fields
        pos += 4  # throttle_time_ms
        n, pos = _uvarint(resp, pos)
        return max(0, n - 1)


def _request(sock: socket.socket, api: int, version: int, corr: int, body: bytes, *, flexible: bool) -> bytes:
    client = b"infeed-harness"
    header = struct.pack(">hhih", api, version, corr, len(client)) + client + (b"\x00" if flexible else b"")
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    (size,) = struct.unpack(">i", _recv(sock, 4))
    data = _recv(sock, size)
    if struct.unpack_from(">i", data)[0] != corr:
        raise OSError("kafka answered another request")
    return data[4:]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("kafka closed the connection")
        buf += chunk
    return buf


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos
