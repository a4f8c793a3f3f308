"""CPU time of a broker's processes, read from Linux ``/proc`` (what a run cost the broker too).

On a machine where the broker shares the cores with the training step, the broker's CPU per
sample is part of what feeding costs: with the step on one core, the feed process and the broker
share the other, so the feed can be no faster than that core allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from infeed import _procfs as procfs

__all__ = ["broker_pids", "tree_cpu_s"]


def broker_pids(name: str, brokers_file: Path) -> list[int]:
    """The pids scripts/brokers recorded for broker ``name`` (none when it is not in the file)."""
    try:
        entry = json.loads(brokers_file.read_text()).get(name) or {}
        return [int(pid) for pid in entry.get("pids", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def tree_cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` and their descendants (0 for what cannot be read)."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            total += procfs.cpu_s(pid) or 0.0
            todo.extend(procfs.children(pid))
    return total
