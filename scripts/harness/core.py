"""Shared pieces of the broker harness: ports, processes, readiness, the state file.

Standard library only: the harness runs with the system python3, before any venv exists.
Every broker runs on 127.0.0.1, on a free non-default port, with its data under a temporary
directory, in its own process session, and is stopped by PID (never by name).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Where the URLs and PIDs of running brokers are written; tests read it.
STATE_FILE = Path(os.environ.get("INFEED_BROKERS_FILE", ROOT / ".infeed" / "brokers.json"))
#: Cache for downloaded jars (Kafka, Pulsar), shared between checkouts.
CACHE_DIR = Path(
    os.environ.get(
        "INFEED_CACHE_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infeed"
    )
)


class HarnessError(RuntimeError):
    """A broker could not be installed, started or reached."""


@dataclass
class Started:
    """What a broker module's ``start`` returns."""

    #: URLs the tests use, e.g. {"url": "redis://127.0.0.1:16379"}; "url" is the main one.
    urls: dict[str, str]
    #: every PID to stop, in stop order (main process first)
    pids: list[int]
    #: folder with the broker's data and logs (removed on stop)
    workdir: str
    log: str
    extra: dict[str, object] = field(default_factory=dict)


def say(msg: str) -> None:
    print(f"brokers: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1 (above the well-known ranges)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"infeed-{name}-"))


def spawn(
    cmd: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session with stdout+stderr appended to ``log``."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )


def log_tail(log: Path | str, lines: int = 40) -> str:
    try:
        text = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_ready(
    name: str,
    check: Callable[[], bool],
    *,
    deadline_s: float,
    log: Path | str,
    proc: subprocess.Popen[bytes] | None = None,
    interval_s: float = 0.2,
) -> None:
    """Poll ``check`` until it returns True; on timeout or early exit raise with the log tail."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{name} exited with {proc.returncode} while starting:\n{log_tail(log)}")
        try:
            if check():
                return
        except Exception:  # readiness probes fail in many ways until the broker is up
            pass
        time.sleep(interval_s)
    raise HarnessError(f"{name} not ready after {deadline_s:.0f}s; last log lines:\n{log_tail(log)}")


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process stays a zombie until its parent (or init, slowly here) reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid``, or the process alone if it leads none."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


def stop_pids(pids: Sequence[int], *, grace_s: float = 10.0) -> None:
    """SIGTERM each PID's process group, wait up to ``grace_s``, then SIGKILL what is left."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
    # reap if they are our children
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def ensure_apt(packages: Sequence[str], binaries: Sequence[str]) -> None:
    """apt-get install ``packages`` unless every one of ``binaries`` is already present."""
    if all(shutil.which(b) or Path(b).exists() for b in binaries):
        return
    if os.geteuid() != 0:
        raise HarnessError(f"need root to apt-get install {' '.join(packages)}")
    say(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env
    )


def read_state() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(state: Mapping[str, object]) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, STATE_FILE)


def started_to_state(s: Started) -> dict[str, object]:
    return asdict(s)


# --- added for restart / reconnect tests (additive) -------------------------------------------


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def kill_hard(pids: Sequence[int], *, wait_s: float = 15.0) -> None:
    """SIGKILL each PID's process group (or the PID alone) and wait until all are gone: a crash."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    end = time.monotonic() + wait_s
    while True:
        for pid in pids:
            _reap(pid)  # our own children would otherwise linger as zombies that look alive
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return
        if time.monotonic() > end:
            raise HarnessError(f"processes {left} still alive {wait_s:.0f}s after SIGKILL")
        time.sleep(0.05)


def wait_port_free(port: int, *, deadline_s: float = 30.0, host: str = "127.0.0.1") -> None:
    """Wait until nothing listens on ``host:port`` (before starting again on the same port)."""
    end = time.monotonic() + deadline_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                pass
        if time.monotonic() > end:
            raise HarnessError(f"port {host}:{port} still in use after {deadline_s:.0f}s")
        time.sleep(0.1)
