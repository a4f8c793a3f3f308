"""Checkpoint directories written atomically, and found again after a crash.

Layout of ``CheckpointStore(directory)``::

    directory/
      LATEST                  the name of the newest complete checkpoint ("step-0000000120")
      step-0000000120/        one checkpoint: files named by the trainer, plus manifest.json
      step-0000000090/        an older one, kept until ``keep`` newer ones exist
      .tmp-step-.../          a checkpoint being written (removed on recovery)

A checkpoint is written into a temporary folder, every file is fsynced, then the folder, then it is
renamed into place and its parent fsynced; only then is ``LATEST`` repointed (temporary file,
fsync, rename, fsync). So ``LATEST`` always names a complete checkpoint, and a folder that is not
(yet) named by it is ignored and removed on recovery: ``LATEST`` is the single truth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from infeed._files import fsync_dir, write_durable

__all__ = [
    "DEFAULT_KEEP",
    "FileSource",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "PhaseHook",
    "Checkpoint",
    "CheckpointStore",
    "fsync_dir",
    "write_durable",
]

#: Complete checkpoints kept (the newest ones); older ones are deleted after a new one lands.
DEFAULT_KEEP = 2
#: The file naming the newest complete checkpoint.
LATEST_FILE = "LATEST"
#: Inside each checkpoint: its files and their sizes, written last.
MANIFEST_FILE = "manifest.json"

_NAME = re.compile(r"^step-(\d{10})$")
_TMP_PREFIX = ".tmp-"

#: A file's content, or a function that writes it at the path given.
FileSource = bytes | Callable[[Path], object]
#: Called with each phase of a write: ``wrote:NAME``, ``written``, ``renamed``, ``latest``.
PhaseHook = Callable[[str], None]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durable(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder.

    Attributes:
        path: the folder.
        step: the training step it was taken after.
        files: file name -> size in bytes (from its manifest).
    """

    path: Path
    step: int
    files: Mapping[str, int]

    def read_bytes(self, name: str) -> bytes:
        """Return the content of file ``name``.

        Raises:
            KeyError: the checkpoint has no such file.
        """
        if name not in self.files:
            raise KeyError(f"checkpoint {self.path} has no file {name!r} (it has {', '.join(self.files)})")
        return (self.path / name).read_bytes()

    def __contains__(self, name: object) -> bool:
        return name in self.files


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step``."""
    return f"step-{step:010d}"


class CheckpointStore:
    """Writes checkpoints atomically into ``directory`` and finds the newest complete one.

    Args:
        directory: the checkpoint folder (created if missing).
        keep: complete checkpoints to keep.

    Raises:
        ValueError: ``keep`` is under 1.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def _latest_name(self) -> str | None:
        try:
            name = (self.directory / LATEST_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _NAME.match(name):
            raise ValueError(f"{self.directory / LATEST_FILE} names {name!r}, not a checkpoint folder")
        return name

    def latest(self) -> Checkpoint | None:
        """Return the checkpoint ``LATEST`` names, or None before the first.

        Raises:
            ValueError: ``LATEST`` names a folder that is missing or incomplete (the folder was
                damaged outside infeed: restore it or remove ``LATEST`` to start over).
        """
        name = self._latest_name()
        return None if name is None else self._open(name)

    def _open(self, name: str) -> Checkpoint:
        path = self.directory / name
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
            files = {str(k): int(v) for k, v in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"checkpoint {path} has no readable {MANIFEST_FILE}: {exc}") from exc
        for file, size in files.items():
            try:
                found = (path / file).stat().st_size
            except OSError as exc:
                raise ValueError(f"checkpoint {path} is missing {file}: {exc}") from exc
            if found != size:
                raise ValueError(f"checkpoint {path}: {file} has {found} bytes, its manifest says {size}")
        match = _NAME.match(name)
        assert match is not None
        return Checkpoint(path, int(match.group(1)), files)

    def recover(self) -> None:
        """Remove what a crash left: temporary folders, and folders newer than ``LATEST``.

        A folder renamed into place but not yet named by ``LATEST`` is complete, but no commit
        or announcement followed it; the run replays those steps and writes it again.
        """
        latest = self._latest_name()
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            stray = match is not None and (latest is None or entry.name > latest)
            if entry.is_dir() and (entry.name.startswith(_TMP_PREFIX) or stray):
                shutil.rmtree(entry)
        (self.directory / (LATEST_FILE + ".tmp")).unlink(missing_ok=True)

    def write(
        self, step: int, files: Mapping[str, FileSource], *, on_phase: PhaseHook | None = None
    ) -> Checkpoint:
        """Write a checkpoint of ``files`` after ``step`` and repoint ``LATEST`` to it.

        Args:
            step: the training step (names the folder).
            files: file name -> bytes, or a function writing the file at the path it is given.
            on_phase: called after each phase (``wrote:NAME``, ``written``, ``renamed``, ``latest``).

        Returns:
            The new checkpoint.

        Raises:
            ValueError: a file name is not a plain name, or is the manifest's.
        """
        hook = on_phase or (lambda phase: None)
        name = checkpoint_name(step)
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        sizes: dict[str, int] = {}
        for file, source in files.items():
            if file == MANIFEST_FILE or "/" in file or file.startswith(".") or not file:
                raise ValueError(f"bad checkpoint file name {file!r}")
            target = tmp / file
            if isinstance(source, bytes):
                write_durable(target, source)
            else:
                source(target)
                _fsync_file(target)
            sizes[file] = target.stat().st_size
            hook(f"wrote:{file}")
        manifest = json.dumps({"step": step, "files": sizes}, indent=1).encode()
        write_durable(tmp / MANIFEST_FILE, manifest)
        fsync_dir(tmp)
        hook("written")
        final = self.directory / name
        if final.exists():  # left by a run that crashed before repointing LATEST
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        hook("renamed")
        _replace_durable(self.directory / LATEST_FILE, (name + "\n").encode())
        hook("latest")
        return Checkpoint(final, step, sizes)

    def prune(self) -> None:
        """Delete complete checkpoints older than the newest ``keep`` (never the one ``LATEST`` names)."""
        latest = self._latest_name()
        names = sorted(e.name for e in self.directory.iterdir() if e.is_dir() and _NAME.match(e.name))
        for old in names[: -self.keep]:
            if old != latest:
                shutil.rmtree(self.directory / old)
