"""Apache Pulsar standalone (3.0 LTS, Java 17) from Maven Central: broker, bookie, metadata store.

Ready when the admin API lists the ``standalone`` cluster and the ``public/default`` namespace
(both created by the standalone starter after the broker is up) and the broker health check,
which writes and reads a heartbeat topic through the bookie, answers ``ok``. Plain ``urllib``:
no Pulsar client library is needed.

A SIGKILL leaves the killed process's ephemeral metadata nodes in the RocksDB metadata store:
the bookie's registration (``/ledgers/available/HOST:PORT``), the broker's registration with the
load manager (``/loadbalance/brokers/HOST:PORT``) and the ownership locks of the namespace bundles
it served (``/namespace/TENANT/NS/RANGE``). The next launch treats such a node as absent but deletes
it only lazily: each read that meets it queues an unconditional, asynchronous delete, which lands
after the new process has re-created the node as its own lock. The lock is then "invalidated",
re-acquired, deleted again by the next queued delete... The bookie registration can loop like
that thousands of times a second, for good (the bookie flaps between available and gone,
subscriptions stop reading: "LastConfirmedEntry is null when reading ledger N"); a bundle lock or
the broker registration that loses the race leaves the bundle's topics unserved (every lookup,
publish and subscribe times out) while the health check, on its own namespace, still passes.
Seen in about half the restarts after SIGKILL. So ``restart`` removes every ephemeral node from the
closed store before it launches (``jvm/PulsarMetadataPurge.java``: with the store closed, all of
them are stale), and readiness includes a topic lookup, which takes a bundle lock through the
load manager. As a second line, every launch is still checked for the registration loop in the
log once ready; a flapping standalone is stopped cleanly (SIGTERM: the bookie removes its
registration) and started again on the same data, up to ``LAUNCH_ATTEMPTS`` times.
"""

from __future__ import annotations

import json
import socket
import string
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import _jvm, core

NAME = "pulsar"
POM = _jvm.JVM_DIR / "pulsar-pom.xml"
CONF_TEMPLATE = _jvm.JVM_DIR / "pulsar-standalone.conf"
#: Removes the ephemeral nodes a killed standalone left in its metadata store (module docstring).
PURGE_SOURCE = _jvm.JVM_DIR / "PulsarMetadataPurge.java"
#: Seconds the purge may take (java compiles the source file first: seconds on a loaded machine).
PURGE_DEADLINE_S = 120.0
#: Topic whose lookup readiness asks for: it makes the broker take a namespace bundle's lock.
READY_TOPIC = "persistent/public/default/infeed-harness-ready"
#: Standalone boots a bookie, a metadata store and the broker: tens of seconds on 2 cores.
START_DEADLINE_S = 180.0
#: Launches of one start or restart before it gives up on a flapping bookie registration.
LAUNCH_ATTEMPTS = 3
#: Log line of the bookie registration loop (see the module docstring).
FLAP_MARK = b"/ledgers/available/"
FLAP_WORDS = b"was invalidated"
#: More such lines than this in one launch's log means the loop is running.
FLAP_LIMIT = 3
#: Seconds to watch the log for the loop once the standalone answers.
FLAP_WATCH_S = 2.0
#: Seconds a flapping standalone gets to stop on SIGTERM before it is killed.
STOP_GRACE_S = 30.0
#: Flags bin/pulsar passes on Java 17: Netty, RocksDB and the CRC32C fast path reach into the JDK.
JVM_FLAGS = (
    "-Xms128m",
    "-Xmx1g",
    "-XX:MaxDirectMemorySize=1g",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.net.preferIPv4Stack=true",
    "-Djava.awt.headless=true",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-opens", "java.base/sun.net=ALL-UNNAMED",
    "--add-opens", "java.management/sun.management=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.platform=ALL-UNNAMED",  # cgroup CPU/memory for the load manager
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dpulsar.allocator.exit_on_oom=true",
    "-Dbookkeeper.metadata.bookie.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver",
    "-Dbookkeeper.metadata.client.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver",
)  # fmt: skip


def start() -> core.Started:
    """Start Pulsar standalone; urls ``pulsar://127.0.0.1:PORT`` and admin ``http://127.0.0.1:WEB``."""
    jars = _jvm.fetch_jars(NAME, POM)
    work = core.make_workdir(NAME)
    names = ("broker", "web", "bookie", "zookeeper", "stream_storage")
    ports = dict(zip(names, core.free_ports(len(names)), strict=True))
    (work / "standalone.conf").write_text(
        string.Template(CONF_TEMPLATE.read_text()).substitute(
            broker_port=ports["broker"], web_port=ports["web"], loopback_interface=_loopback_interface()
        )
    )
    return _launch_checked(jars, work, ports)


def restart(state: dict[str, Any]) -> core.Started:
    """SIGKILL what is left of the standalone, then start it again on the same ports and data."""
    ports = {k: int(v) for k, v in state["extra"]["ports"].items()}
    core.kill_hard([int(p) for p in state["pids"]])
    for port in ports.values():
        core.wait_port_free(port)
    jars, work = Path(str(state["extra"]["jars"])), Path(str(state["workdir"]))
    _purge_ephemeral(jars, work)
    return _launch_checked(jars, work, ports)


def _purge_ephemeral(jars: Path, work: Path) -> None:
    """Remove the ephemeral nodes a killed standalone left in its (closed) metadata store."""
    rocksdb = sorted(jars.glob("rocksdbjni-*.jar"))
    if not rocksdb:
        raise core.HarnessError(f"{NAME}: no rocksdbjni jar in {jars}")
    cmd = [_jvm.java(), "-cp", str(rocksdb[-1]), str(PURGE_SOURCE), str(work / "data" / "metadata")]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PURGE_DEADLINE_S, check=False)
    except subprocess.TimeoutExpired:
        raise core.HarnessError(
            f"{NAME}: purging the metadata store took over {PURGE_DEADLINE_S:.0f}s (data kept in {work})"
        ) from None
    if done.returncode != 0:
        raise core.HarnessError(
            f"{NAME}: purging the stale ephemeral nodes of the metadata store failed with "
            f"{done.returncode} (java's source-file mode needs a JDK, not only a JRE; data kept in "
            f"{work}):\n{done.stderr.strip()[-2000:]}"
        )
    paths = done.stdout.split()
    with open(work / "pulsar.log", "a") as log:  # kept with the broker's own lines
        log.write(f"harness: removed {len(paths)} stale ephemeral metadata nodes: {' '.join(paths)}\n")
    core.say(f"{NAME}: removed {len(paths)} stale ephemeral metadata nodes")


def _launch_checked(jars: Path, work: Path, ports: dict[str, int]) -> core.Started:
    """``_launch``, again after a clean stop while the bookie registration flaps (module docstring)."""
    log = work / "pulsar.log"
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        offset = log.stat().st_size if log.exists() else 0
        started = _launch(jars, work, ports)
        time.sleep(FLAP_WATCH_S)  # the loop starts before the broker answers; give it time to show
        flaps = _flap_lines(log, offset)
        if flaps <= FLAP_LIMIT:
            return started
        core.say(
            f"{NAME}: bookie registration flapping ({flaps} lock invalidations, launch {attempt} of "
            f"{LAUNCH_ATTEMPTS}); stopping it cleanly and starting again"
        )
        core.stop_pids(started.pids, grace_s=STOP_GRACE_S)
        for port in ports.values():
            core.wait_port_free(port)
        _purge_ephemeral(jars, work)  # left behind if the stop ran out of grace and killed it
    raise core.HarnessError(
        f"{NAME}: the bookie registration flapped after each of {LAUNCH_ATTEMPTS} launches "
        f"(data and log kept in {work}); last log lines:\n{core.log_tail(log)}"
    )


def _error_lines(log: Path, offset: int, limit: int = 10) -> str:
    """The first ``limit`` ERROR lines written to ``log`` after ``offset`` (the tail is often noise)."""
    found: list[str] = []
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            if b" ERROR " in line:
                found.append(line.decode("utf-8", "replace").rstrip()[:400])
                if len(found) >= limit:
                    break
    return "\n".join(found)


def _flap_lines(log: Path, offset: int) -> int:
    """Lines of the bookie registration loop written to ``log`` after ``offset``."""
    with open(log, "rb") as f:
        f.seek(offset)
        return sum(1 for line in f if FLAP_WORDS in line and FLAP_MARK in line)


def _launch(jars: Path, work: Path, ports: dict[str, int]) -> core.Started:
    data = work / "data"
    args = [
        "--config", str(work / "standalone.conf"),
        "--no-functions-worker",
        "--no-stream-storage",
        "--metadata-dir", str(data / "metadata"),
        "--bookkeeper-dir", str(data / "bookkeeper"),
        "--bookkeeper-port", str(ports["bookie"]),
        # unused with the RocksDB metadata store and without stream storage; set anyway so that
        # nothing ever falls back to the well-known 2181 / 4181
        "--zookeeper-dir", str(data / "zookeeper"),
        "--zookeeper-port", str(ports["zookeeper"]),
        "--stream-storage-port", str(ports["stream_storage"]),
    ]  # fmt: skip
    log = work / "pulsar.log"
    offset = log.stat().st_size if log.exists() else 0
    cmd = _jvm.java_cmd(jars, "org.apache.pulsar.PulsarStandaloneStarter", args, flags=JVM_FLAGS)
    proc = core.spawn(cmd, log=log, cwd=work)
    admin = f"http://127.0.0.1:{ports['web']}"
    t0 = time.monotonic()
    try:
        core.wait_ready(
            NAME, lambda: _ready(admin), deadline_s=START_DEADLINE_S, log=log, proc=proc, interval_s=0.5
        )
    except BaseException as exc:
        core.kill_hard([proc.pid])
        if not isinstance(exc, core.HarnessError):
            raise
        errors = _error_lines(log, offset)
        first = f"\nfirst errors of this launch:\n{errors}" if errors else ""
        raise core.HarnessError(f"{exc}{first}\n(data and log kept in {work})") from None
    url = f"pulsar://127.0.0.1:{ports['broker']}"
    core.say(f"{NAME}: ready in {time.monotonic() - t0:.1f}s at {url}")
    return core.Started(
        urls={"url": url, "admin": admin},
        pids=[proc.pid],
        workdir=str(work),
        log=str(log),
        extra={"jars": str(jars), "ports": ports},
    )


def _get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return bytes(resp.read())


def _ready(admin: str) -> bool:
    if "standalone" not in json.loads(_get(f"{admin}/admin/v2/clusters")):
        return False
    if "public/default" not in json.loads(_get(f"{admin}/admin/v2/namespaces/public")):
        return False
    if _get(f"{admin}/admin/v2/brokers/health", timeout_s=30.0).strip() != b"ok":
        return False
    # a lookup goes through the load manager and takes a bundle lock: what clients need first
    return "brokerUrl" in json.loads(_get(f"{admin}/lookup/v2/topic/{READY_TOPIC}", timeout_s=30.0))


def _loopback_interface() -> str:
    """Name of the loopback interface, for the bookie's ``listeningInterface`` (``lo`` on Linux)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")
