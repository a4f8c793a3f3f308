"""Connections, transactions, schema and error mapping of the ``sqlite://`` broker.

Every thread of every process gets its own connection (SQLite connections must not be shared
across threads mid-transaction, nor carried across ``fork``). A child process never touches the
connections it inherited: it opens new ones and keeps the old objects referenced forever, because
closing them would run SQLite's close path on state that belongs to the parent
(https://www.sqlite.org/howtocorrupt.html, section 2.6).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from infeed.errors import BrokerConnectionError, BrokerError, BrokerTimeoutError

#: Version of sqlite_schema.sql, kept in PRAGMA user_version.
SCHEMA_VERSION = 1

# Every exception class sqlite3 exports, and what it becomes. OperationalError and DatabaseError
# are refined by their SQLite error code or message in translate().
ERROR_MAP: dict[type[Exception], type[BrokerError]] = {
    sqlite3.Error: BrokerError,
    sqlite3.Warning: BrokerError,
    sqlite3.InterfaceError: BrokerError,
    sqlite3.DatabaseError: BrokerError,
    sqlite3.InternalError: BrokerError,
    sqlite3.OperationalError: BrokerError,
    sqlite3.ProgrammingError: BrokerError,
    sqlite3.IntegrityError: BrokerError,
    sqlite3.DataError: BrokerError,
    sqlite3.NotSupportedError: BrokerError,
}
_WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_CANTOPEN_CODE = 14

# Connections a forked child inherited: referenced forever so they are never closed in the child.
_INHERITED: list[object] = []
_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def translate(exc: Exception, path: str) -> BrokerError:
    """Return the infeed error for a sqlite3 exception raised on the database at ``path``."""
    kind = next((ERROR_MAP[k] for k in type(exc).__mro__ if k in ERROR_MAP), BrokerError)
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError):
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in _BUSY_CODES or "database is locked" in text or "is locked" in text:
            return BrokerTimeoutError(
                f"sqlite database {path} stayed locked by another writer past busy_timeout_s: {text}; "
                "raise busy_timeout_s or write in larger batches"
            )
        if primary == _CANTOPEN_CODE or "unable to open" in text:
            return BrokerConnectionError(
                f"cannot open sqlite database {path}: {text}; check the path and its permissions"
            )
    return kind(f"sqlite database {path}: {type(exc).__name__}: {text}")


@contextlib.contextmanager
def map_errors(path: str) -> Iterator[None]:
    """The one place where sqlite3 exceptions become infeed errors (raised ``from`` the cause)."""
    try:
        yield
    except (sqlite3.Error, sqlite3.Warning) as exc:
        raise translate(exc, path) from exc


def schema_statements() -> list[str]:
    """The statements of sqlite_schema.sql, in order."""
    text = resources.files("infeed.brokers").joinpath("sqlite_schema.sql").read_text(encoding="utf-8")
    statements, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


@dataclass(slots=True)
class _Handle:
    conn: sqlite3.Connection
    thread: threading.Thread


class Pool:
    """One connection per thread and process to one database file, plus in-process wakeups."""

    def __init__(self, path: str, *, synchronous: str, busy_timeout_s: float) -> None:
        self.path = path
        self.closed = False
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._reset()
        _POOLS.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._handles: list[_Handle] = []
        #: bumped on every in-process change a waiting consumer may care about
        self.generation = 0

    def after_fork(self) -> None:
        _INHERITED.extend(h.conn for h in self._handles)
        self._reset()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, and again after a fork)."""
        if self.closed:
            raise BrokerError(f"sqlite broker on {self.path} is closed")
        handle: tuple[int, sqlite3.Connection] | None = getattr(self._local, "handle", None)
        if handle is not None and handle[0] == os.getpid():
            return handle[1]
        if self._pid != os.getpid():  # a fork that skipped the at-fork hooks
            self.after_fork()
        with map_errors(self.path):
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # explicit BEGIN IMMEDIATE / COMMIT only
                check_same_thread=False,  # so close() may close every thread's connection
                cached_statements=64,
            )
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            # Cut the WAL file back to this size when a checkpoint restarts it.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
        with self._lock:
            live = []
            for h in self._handles:  # close connections of threads that ended
                if h.thread.is_alive():
                    live.append(h)
                else:
                    h.conn.close()
            live.append(_Handle(conn, threading.current_thread()))
            self._handles = live
        self._local.handle = (os.getpid(), conn)
        return conn

    def init_schema(self) -> None:
        """Check the file is an infeed database (or empty), turn WAL on, and create the schema."""
        conn = self.conn()
        with map_errors(self.path):
            self._check_version(conn)  # before anything changes a file that is not ours
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()  # a no-op once it is WAL
        if str(mode).lower() != "wal":
            raise BrokerError(f"sqlite database {self.path} cannot use WAL mode (journal_mode={mode})")
        with self.tx() as conn:
            if self._check_version(conn) == 0:  # checked again: another process may have won
                for statement in schema_statements():
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, conn: sqlite3.Connection) -> int:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            raise BrokerError(
                f"sqlite database {self.path} has infeed schema version {version}; this infeed "
                f"reads version {SCHEMA_VERSION}: upgrade infeed, or use another file"
            )
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise BrokerError(
                f"sqlite database {self.path} holds tables that are not infeed's; use another file"
            )
        return int(version)

    @contextlib.contextmanager
    def tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: ``BEGIN IMMEDIATE`` (takes the write lock up front) or a read snapshot."""
        conn = self.conn()
        with map_errors(self.path):
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    # The first error is the one to report; a failed rollback adds nothing.
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one read-only statement in autocommit mode."""
        conn = self.conn()
        with map_errors(self.path):
            return conn.execute(sql, params).fetchall()

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (PRAGMA data_version)."""
        conn = self.conn()
        with map_errors(self.path):
            return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def notify(self) -> None:
        """Wake consumers of this process that wait in receive."""
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, generation: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a change after ``generation``; return whether one came."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation != generation, timeout_s)

    def close(self) -> None:
        """Close every connection this process opened. Idempotent."""
        self.closed = True
        with self._lock:
            handles, self._handles = self._handles, []
        with map_errors(self.path):
            for h in handles:
                h.conn.close()
        self.notify()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
