"""Child processes for the contract suite's multi-process tests.

python -m tests.contract._worker hold URL TOPIC GROUP N
python -m tests.contract._worker produce URL TOPIC START COUNT BATCH
python -m tests.contract._worker consume URL TOPIC GROUP OUT_FILE DONE_FILE QUIET_S
    (says "ready" once it is a member of the group)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from infeed.brokers import connect
from infeed.errors import LeaseLostError
from infeed.types import Delivery
from tests.support import say

PAD = b"." * 120


def encode_id(i: int) -> bytes:
    return i.to_bytes(8, "big") + PAD


def decode_id(payload: bytes) -> int:
    return int.from_bytes(payload[:8], "big")


def hold(url: str, topic: str, group: str, n: int) -> None:
    """Receive ``n`` deliveries without acking, report their positions, then wait to be killed."""
    broker = connect(url)
    consumer = broker.subscribe(topic, group=group)
    got: list[Delivery] = []
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        got.extend(consumer.receive(max_messages=n - len(got), timeout_s=1.0))
    print(json.dumps([d.position.to_json() for d in got]), flush=True)
    time.sleep(3600)


def produce(url: str, topic: str, start: int, count: int, batch: int) -> None:
    broker = connect(url)
    for lo in range(start, start + count, batch):
        hi = min(lo + batch, start + count)
        broker.publish_many(topic, [encode_id(i) for i in range(lo, hi)])
    broker.close()


def consume(url: str, topic: str, group: str, out_file: str, done_file: str, quiet_s: float) -> None:
    """Receive and ack until the producers are done and nothing arrived for ``quiet_s``."""
    broker = connect(url)
    consumer = broker.subscribe(topic, group=group)
    say("ready")
    acked: list[int] = []
    lost: list[int] = []
    last = time.monotonic()
    while True:
        batch = consumer.receive(max_messages=500, timeout_s=0.5)
        if batch:
            ids = [decode_id(d.payload) for d in batch]
            try:
                consumer.ack(batch)
                acked.extend(ids)
            except LeaseLostError as exc:
                gone = set(exc.positions)
                for d, i in zip(batch, ids, strict=True):
                    (lost if d.position in gone else acked).append(i)
            last = time.monotonic()
        elif Path(done_file).exists() and time.monotonic() - last > quiet_s:
            break
    consumer.close()
    broker.close()
    Path(out_file).write_text(json.dumps({"acked": acked, "lost": lost}))


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "hold":
        hold(args[0], args[1], args[2], int(args[3]))
    elif mode == "produce":
        produce(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif mode == "consume":
        consume(args[0], args[1], args[2], args[3], args[4], float(args[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
