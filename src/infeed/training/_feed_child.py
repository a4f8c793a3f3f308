"""The feed process: a dataset's consumer and prefetch thread, on a core beside the training step.

``_feed.ProcessFeed`` starts it as ``python -m infeed.training._feed_child FD`` (FD: the shared
ring). Commands come as frames on stdin, one at a time:

- ``open``: connect, subscribe, seek to where reading resumes; answers ``ready`` with the positions
  and the epoch plan (or ``failed``);
- ``run``: start a prefetch thread at the given positions and plan (again after an ``idle``);
- ``commit``: commit positions on the consumer's thread; answers ``reply`` with the same ``id``;
- ``stop``, or the end of stdin (the training process ended, however it ended): leave the group
  and exit.

Events go out as frames on stdout: ``chunk`` (arrays in the ring), ``epoch_end``, ``stream_end``,
``idle``, ``failed``. The process imports neither torch nor anything that pickles.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import threading
import traceback
from typing import IO, Any

from infeed.brokers import Broker, connect
from infeed.codecs import Schema
from infeed.streams import StreamConsumer
from infeed.training._chunks import Chunk
from infeed.training._prefetch import EpochEnd, Failed, Idle, Item, Prefetcher, StreamEnd
from infeed.training._ring import RingWriter, encode_chunk, map_ring, read_frame, write_frame
from infeed.training._start import plan_from_json, plan_to_json, position_at_start, subscribe_stream
from infeed.training.state import decode_positions, encode_positions
from infeed.types import Capability, Position

__all__ = ["error_frame", "main"]

_MARKERS: dict[type[Any], str] = {EpochEnd: "epoch_end", StreamEnd: "stream_end", Idle: "idle"}


def error_frame(exc: BaseException) -> dict[str, Any]:
    """A frame describing ``exc`` (its class name, message and traceback)."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "trace": "".join(traceback.format_exception(exc)),
    }


class _Out:
    """stdout, written by the prefetch thread and the command loop, one frame at a time."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, obj: dict[str, Any], raw: bytes = b"") -> None:
        with self._lock:
            write_frame(self._stream, obj, raw)


class _RingSink:
    """The prefetcher's sink here: chunks into the ring, everything as a frame on stdout."""

    def __init__(self, ring: RingWriter, out: _Out, stream: StreamConsumer) -> None:
        self._ring = ring
        self._out = out
        self._stream = stream

    def put(self, item: Item, nbytes: int, *, wake: Any) -> bool:
        if isinstance(item, Chunk):
            encoded = encode_chunk(item, self._ring, wake)
            if encoded is None:
                return False
            frame, raw = encoded
            frame["dead_lettered"] = self._stream.dead_lettered
            self._out.send(frame, raw)
        elif isinstance(item, Failed):
            self._out.send({"t": "failed", **error_frame(item.error)})
        else:
            self._out.send({"t": _MARKERS[type(item)], "dead_lettered": self._stream.dead_lettered})
        return True

    def notify(self) -> None:
        """Nothing to wake: a full ring is polled, and the poll runs the commands."""


class _Feed:
    def __init__(self, config: dict[str, Any], ring: RingWriter, out: _Out) -> None:
        self.config = config
        self.out = out
        self.ring = ring
        self.broker: Broker = connect(config["url"])
        self.topic: str = config["topic"]
        self.stream = subscribe_stream(
            self.broker,
            self.topic,
            group=config["group"],
            schema=Schema.from_dict(config["schema"]),
            partitions=config["partitions"],
            dead_letter_topic=config["dead_letter_topic"],
        )
        self.prefetcher: Prefetcher | None = None

    def ready(self) -> dict[str, Any]:
        c = self.config
        positions, plan = position_at_start(
            self.broker,
            self.stream.consumer,
            self.topic,
            partitions=c["partitions"],
            resume=decode_positions(c["resume"]),
            plan=plan_from_json(c["plan"]),
            epochs=c["epochs"],
            epoch=c["epoch"],
        )
        return {"t": "ready", "positions": encode_positions(positions), "plan": plan_to_json(plan)}

    def run(self, frame: dict[str, Any]) -> None:
        if self.prefetcher is not None:
            self.prefetcher.stop()
        c = self.config
        self.prefetcher = Prefetcher(
            self.stream,
            fields=tuple(c["schema"]),
            resume=decode_positions(frame["resume"]),
            ack_on_receipt=True,
            plan=plan_from_json(frame["plan"]),
            capacity_bytes=self.ring.capacity,
            max_messages=c["max_messages"],
            target_records=c["target_records"],
            poll_s=c["poll_s"],
            idle_timeout_s=c["idle_timeout_s"],
            sink=_RingSink(self.ring, self.out, self.stream),
            merge=True,
        )
        self.prefetcher.start()

    def commit(self, frame: dict[str, Any]) -> None:
        positions = decode_positions(frame["positions"])
        tap = self.stream.consumer

        def work() -> None:
            if positions and self.broker.supports(Capability.OFFSET_COMMIT):
                tap.commit([Position(self.topic, p, pos.offset) for p, pos in positions.items()])

        reply: dict[str, Any] = {"t": "reply", "id": frame["id"], "error": None}
        try:
            if self.prefetcher is not None:
                self.prefetcher.call(work)
            else:
                work()
        except Exception as exc:
            reply["error"] = error_frame(exc)
        self.out.send(reply)

    def close(self) -> None:
        try:
            if self.prefetcher is not None:
                self.prefetcher.stop()
            self.stream.close()
        finally:
            self.broker.close()


def _serve(stdin: IO[bytes], out: _Out, mapping: mmap.mmap) -> int:
    first = read_frame(stdin)
    if first is None:
        return 0
    config = first[0]
    try:
        feed = _Feed(config, RingWriter(mapping), out)
    except Exception as exc:
        out.send({"t": "failed", **error_frame(exc)})
        return 1
    try:
        out.send(feed.ready())
        while True:
            got = read_frame(stdin)
            if got is None or got[0]["op"] == "stop":
                return 0
            frame = got[0]
            if frame["op"] == "run":
                feed.run(frame)
            elif frame["op"] == "commit":
                feed.commit(frame)
            else:
                raise ValueError(f"unknown feed command {frame['op']!r}")
    except Exception as exc:
        out.send({"t": "failed", **error_frame(exc)})
        return 1
    finally:
        _LEAVING.set()
        feed.close()


#: How often the feed process checks that its training process is still there.
ORPHAN_CHECK_S = 0.5


#: Set once the feed is leaving: a SIGTERM then must not cut its goodbye to the broker short.
_LEAVING = threading.Event()


def _leave(signum: int, frame: Any) -> None:
    if not _LEAVING.is_set():
        raise SystemExit(0)  # unwinds through ``_serve``'s finally: the consumer leaves its group


def _watch_parent(parent: int) -> None:
    """SIGTERM this process once the training process is gone, unless it is leaving already.

    The end of stdin says so at once, unless another process forked from the training process
    still holds the pipe; then being re-parented does.
    """
    while os.getppid() == parent:
        if _LEAVING.wait(ORPHAN_CHECK_S):
            return
    if not _LEAVING.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    """Serve one dataset's feed; the ring's file descriptor is ``argv[1]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the training process, which stops us
    signal.signal(signal.SIGTERM, _leave)
    threading.Thread(
        target=_watch_parent, args=(os.getppid(),), name="infeed-feed-orphan", daemon=True
    ).start()
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m infeed.training._feed_child RING_FD", file=sys.stderr)
        return 2
    mapping = map_ring(int(argv[1]))  # never closed: views of it live until the process ends
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the frames
    sys.stdout = sys.stderr
    return _serve(sys.stdin.buffer, _Out(frames), mapping)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
