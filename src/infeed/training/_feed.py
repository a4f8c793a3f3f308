"""``ProcessFeed``: a dataset's consumer and prefetch thread, run in a feed process.

Receiving and decoding one-record messages costs about as much CPU per sample as the training step
itself; in a thread of the training process that work takes turns with the step under the GIL. In
its own process (``_feed_child``) it runs on the other core: the step only copies records out of
the shared ring (``_ring``). The feed process is this process's child and dies with it (it exits
when its stdin closes), so a killed trainer leaves no group member behind.

Only for brokers that can seek and that several processes may share: the checkpoint's positions
are the truth and every message is acked on receipt, so nothing but positions crosses back.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import infeed
from infeed import _procfs as procfs
from infeed import errors
from infeed.codecs import Schema
from infeed.training._prefetch import ByteQueue, EpochEnd, EpochPlan, Failed, Idle, Item, StreamEnd
from infeed.training._ring import RingReader, create_ring, decode_chunk, read_frame, write_frame
from infeed.training._start import plan_from_json, plan_to_json
from infeed.training.state import decode_positions, encode_positions
from infeed.types import Position

__all__ = ["FeedProcessError", "ProcessFeed", "rebuild_error"]

#: How long ``stop`` waits for the feed process to leave its group before killing it.
STOP_WAIT_S = 10.0
_MARKERS: dict[str, Item] = {"epoch_end": EpochEnd(), "stream_end": StreamEnd(), "idle": Idle()}


class FeedProcessError(RuntimeError):
    """The feed process failed with an error that is not one of infeed's or Python's own."""


def rebuild_error(frame: Mapping[str, Any]) -> BaseException:
    """The feed process's error as an exception of the same class where it is infeed's or built in."""
    name, message = str(frame.get("type")), f"{frame.get('message')} (in the feed process)"
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return FeedProcessError(f"{name}: {message}\n{frame.get('trace', '')}")


def _child_env() -> dict[str, str]:
    """This environment, with the directory infeed is imported from first on the child's path."""
    env = dict(os.environ)
    root = str(Path(infeed.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ProcessFeed:
    """The training process's handle on a feed process (see the module docstring).

    It offers what the dataset uses of a ``Prefetcher``: :attr:`queue` of chunks and markers,
    :meth:`is_alive` and :meth:`stop`; plus :meth:`commit` and :meth:`release`.

    Args:
        url: the broker URL the feed process connects to.
        topic, group, schema, partitions, dead_letter_topic: as the dataset's.
        capacity_bytes: size of the shared ring (the bytes read ahead).
        max_messages, target_records, poll_s, idle_timeout_s: as the ``Prefetcher``'s.
    """

    def __init__(
        self,
        url: str,
        *,
        topic: str,
        group: str,
        schema: Schema,
        partitions: Sequence[int] | None,
        dead_letter_topic: str | None,
        capacity_bytes: int,
        max_messages: int,
        target_records: int,
        poll_s: float,
        idle_timeout_s: float | None,
    ) -> None:
        self.topic = topic
        self._config: dict[str, Any] = {
            "op": "open",
            "url": url,
            "topic": topic,
            "group": group,
            "schema": schema.to_dict(),
            "partitions": None if partitions is None else list(partitions),
            "dead_letter_topic": dead_letter_topic,
            "max_messages": max_messages,
            "target_records": target_records,
            "poll_s": poll_s,
            "idle_timeout_s": idle_timeout_s,
        }
        #: Chunks and markers, in the order the feed process sent them (bounded by the ring).
        self.queue = ByteQueue(2**62)
        #: Messages and records the feed process sent to the dead-letter topic.
        self.dead_lettered = 0
        self._fd, self._mapping = create_ring(capacity_bytes)
        self._ring = RingReader(self._mapping)
        self._lock = threading.Lock()
        self._replies: dict[int, Future[None]] = {}
        self._ready: Future[dict[str, Any]] = Future()
        self._next_id = 0
        self._running = False
        self._stopping = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "infeed.training._feed_child", str(self._fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._fd,),
            env=_child_env(),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._reader = threading.Thread(
            target=self._read, args=(self._proc.stdout,), name="infeed-feed-reader", daemon=True
        )
        self._reader.start()

    # -- commands -------------------------------------------------------------------------------

    def _send(self, obj: dict[str, Any]) -> None:
        with self._lock:
            try:
                write_frame(self._stdin, obj)
            except (BrokenPipeError, ValueError) as exc:  # ValueError: stdin closed by stop()
                raise FeedProcessError(f"the feed process is gone (exit code {self._proc.poll()})") from exc

    def open(
        self,
        *,
        resume: Mapping[int, Position],
        plan: EpochPlan | None,
        epochs: int | None,
        epoch: int,
    ) -> tuple[dict[int, Position], EpochPlan | None]:
        """Subscribe and seek in the feed process; return the positions reading starts at and the plan.

        Raises:
            BrokerError, ValueError, ...: what subscribing raised in the feed process.
        """
        config = dict(self._config)
        config.update(resume=encode_positions(resume), plan=plan_to_json(plan), epochs=epochs, epoch=epoch)
        self._send(config)
        ready = self._ready.result()
        return decode_positions(ready["positions"]), plan_from_json(ready["plan"])

    def run(self, *, resume: Mapping[int, Position], plan: EpochPlan | None) -> None:
        """Start reading ahead at ``resume`` (the dataset's next positions) within ``plan``."""
        self._send({"op": "run", "resume": encode_positions(resume), "plan": plan_to_json(plan)})
        self._running = True

    def commit(self, positions: Mapping[int, Position]) -> None:
        """Commit ``positions`` for the group, on the feed process's consumer; wait for it.

        Raises:
            BrokerError: the commit failed; FeedProcessError: the feed process is gone.
        """
        future: Future[None] = Future()
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            self._replies[ident] = future
        self._send({"op": "commit", "id": ident, "positions": encode_positions(positions)})
        future.result()

    @property
    def capacity_bytes(self) -> int:
        """The size of the shared ring."""
        return self._ring.capacity

    def release(self, end: int) -> None:
        """The records before ring position ``end`` have been copied out: the ring may reuse it."""
        self._ring.release(end)

    def cpu_s(self) -> float:
        """CPU seconds the feed process has used so far (user + system; Linux ``/proc``)."""
        used = procfs.cpu_s(self._proc.pid)
        return 0.0 if used is None else used  # None: ended (its time is no longer there to read)

    def is_alive(self) -> bool:
        """Whether the feed process reads ahead now."""
        return self._running and not self._stopping and self._proc.poll() is None

    def stop(self) -> None:
        """Ask the feed process to leave its group and exit; kill it if it has not within a while."""
        if self._stopping:
            return
        self._stopping = True
        self._running = False
        try:
            self._send({"op": "stop"})
        except FeedProcessError:
            pass
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        os.close(self._fd)

    # -- the reader thread ----------------------------------------------------------------------

    def _fail_waiters(self, error: BaseException) -> None:
        with self._lock:
            waiting, self._replies = list(self._replies.values()), {}
        for future in waiting:
            future.set_exception(error)
        if not self._ready.done():
            self._ready.set_exception(error)

    def _read(self, stream: Any) -> None:
        try:
            while True:
                got = read_frame(stream)
                if got is None:
                    break
                self._dispatch(*got)
        except Exception as exc:  # a broken frame: the feed cannot go on
            self.queue.put(Failed(exc), 0, wake=lambda: False)
        code = self._proc.wait()
        if not self._stopping:
            error = FeedProcessError(f"the feed process exited (code {code})")
            self._fail_waiters(error)
            self.queue.put(Failed(error), 0, wake=lambda: False)
        else:
            self._fail_waiters(FeedProcessError("the feed process was stopped"))

    def _dispatch(self, frame: dict[str, Any], raw: bytes) -> None:
        kind = frame.get("t")
        if "dead_lettered" in frame:
            self.dead_lettered = int(frame["dead_lettered"])
        if kind == "chunk":
            chunk = decode_chunk(frame, raw, self._ring)
            self.queue.put(chunk, chunk.nbytes, wake=lambda: False)
        elif kind in _MARKERS:
            if kind == "idle":
                self._running = False
            self.queue.put(_MARKERS[kind], 0, wake=lambda: False)
        elif kind == "ready":
            self._ready.set_result(frame)
        elif kind == "reply":
            with self._lock:
                future = self._replies.pop(int(frame["id"]), None)
            if future is not None:
                if frame["error"] is None:
                    future.set_result(None)
                else:
                    future.set_exception(rebuild_error(frame["error"]))
        elif kind == "failed":
            error = rebuild_error(frame)
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                self._running = False
                self.queue.put(Failed(error), 0, wake=lambda: False)
        else:
            raise ValueError(f"unknown frame from the feed process: {kind!r}")
