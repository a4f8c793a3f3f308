"""A group member in a child process, for the NATS lease tests (it is paused with SIGSTOP).

python -m tests.integration._nats_member URL TOPIC GROUP TIMEOUT_S

Says ``ready`` once subscribed; then, for every line read on stdin, receives once (up to 10
messages, waiting up to TIMEOUT_S), acks what it got and says one JSON line:
``{"acked": [...]}`` (payloads whose ack was taken), ``{"lost": [...]}`` (LeaseLostError) or
``{"error": "..."}`` (any other infeed error).
"""

from __future__ import annotations

import json
import sys

from infeed.brokers import connect
from infeed.errors import InfeedError, LeaseLostError
from tests.support import say


def main(url: str, topic: str, group: str, timeout_s: float) -> None:
    broker = connect(url)
    consumer = broker.subscribe(topic, group=group)
    say("ready")
    for _ in sys.stdin:
        try:
            batch = consumer.receive(max_messages=10, timeout_s=timeout_s)
            payloads = [d.payload.decode() for d in batch]
            try:
                consumer.ack(batch)
                say(json.dumps({"acked": payloads}))
            except LeaseLostError:
                say(json.dumps({"lost": payloads}))
        except InfeedError as exc:
            say(json.dumps({"error": type(exc).__name__}))
    consumer.close()
    broker.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
