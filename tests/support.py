"""Helpers shared by the test folders: where real brokers are, how to run child processes, and how
they write lines a parent reads (one write each, so a SIGKILL cannot cut one in two)."""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Written by scripts/brokers: {name: {"urls": {"url": ...}, "pids": [...], ...}}
BROKERS_FILE = Path(os.environ.get("INFEED_BROKERS_FILE", ROOT / ".infeed" / "brokers.json"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def running_brokers() -> dict[str, dict[str, Any]]:
    """Return the brokers scripts/brokers reports as started."""
    try:
        data = json.loads(BROKERS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def harness(name: str) -> Any:
    """The module ``scripts/harness/NAME.py`` (beside scripts/brokers, outside the package)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(f"harness.{name}")


def broker_url(name: str, key: str = "url") -> str:
    """Return the URL of a real broker, or fail (under CI=true) / skip loudly (elsewhere)."""
    entry = running_brokers().get(name)
    url = entry.get("urls", {}).get(key) if entry else None
    if not url:
        message = (
            f"real broker {name!r} is not running (start it with: scripts/brokers start {name}); "
            f"state file {BROKERS_FILE}"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return str(url)


def child_env() -> dict[str, str]:
    """Environment for child Python processes: the package on the path, unbuffered output."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_python(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``python ARGS`` with the package importable and text pipes."""
    return subprocess.Popen(
        [sys.executable, *args],
        env=child_env(),
        cwd=str(ROOT),
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        stdin=kwargs.pop("stdin", subprocess.DEVNULL),
        text=True,
        **kwargs,
    )


def say(line: str) -> None:
    """Write ``line`` and its newline to stdout with one ``write(2)``.

    ``print`` writes the newline apart: a process SIGKILLed between the two writes leaves a line
    without its end in a pipe it shares with others, and the next line written there (its parent's
    ``exit`` line, say) is glued onto it. One write of at most ``PIPE_BUF`` bytes to a pipe is
    atomic, so a reader sees the whole line or nothing of it.

    Raises:
        ValueError: ``line`` holds a newline, or is longer than ``PIPE_BUF``.
    """
    data = f"{line}\n".encode()
    if "\n" in line or len(data) > select.PIPE_BUF:
        raise ValueError(f"not one line of at most {select.PIPE_BUF} bytes: {line[:200]!r}")
    sys.stdout.flush()  # whatever was written before goes first
    os.write(sys.stdout.fileno(), data)


def line_pipe() -> tuple[int, int]:
    """Return ``(read_fd, write_fd)`` of a pipe in packet mode (Linux ``O_DIRECT``).

    Each ``write(2)`` to it is read back as one packet, so :func:`read_lines` catches a writer that
    sends a line in pieces (as ``print`` does), which a SIGKILL could cut in two.
    """
    return os.pipe2(os.O_DIRECT | os.O_CLOEXEC)


def read_lines(fd: int) -> Iterator[str]:
    """Yield the lines written to the packet-mode pipe ``fd`` (:func:`line_pipe`) until its end.

    Closes ``fd`` when done.

    Raises:
        ValueError: a write that was not exactly one whole line, named.
    """
    try:
        while packet := os.read(fd, select.PIPE_BUF):
            if not packet.endswith(b"\n") or b"\n" in packet[:-1]:
                raise ValueError(
                    f"a write that is not one whole line: {packet[:200]!r} "
                    "(a SIGKILL could cut such a line in two; write lines with tests.support.say)"
                )
            yield packet[:-1].decode()
    finally:
        os.close(fd)
