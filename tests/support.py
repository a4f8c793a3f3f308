"""Helpers shared by the test folders: where real brokers are, and how to run child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
        stdin=subprocess.DEVNULL,
        text=True,
        **kwargs,
    )
