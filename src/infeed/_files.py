"""Durable file writes shared by the layers that keep state on disk (checkpoints, model registry)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_durable"]


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not its folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
