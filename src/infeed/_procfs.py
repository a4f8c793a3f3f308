"""Reading other processes from Linux ``/proc``: CPU time, memory marks, command line, children.

Each reader answers ``None`` (or nothing) for what cannot be read: a process that ended, or an
OS without ``/proc``. ``pid`` may be ``"self"``.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["children", "cmdline", "cpu_s", "status_bytes"]


def cpu_s(pid: int | str) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (every thread)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def status_bytes(pid: int | str, key: str) -> int | None:
    """A ``kB`` line of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cmdline(pid: int | str) -> bytes | None:
    """The raw command line of ``pid`` (NUL-separated)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return None


def children(pid: int | str) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children") as file:
                pids.extend(int(child) for child in file.read().split())
    return pids
