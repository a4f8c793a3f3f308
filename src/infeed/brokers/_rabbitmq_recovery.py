"""What a client must do so that RabbitMQ (3.10) comes back whole after its node is SIGKILLed.

Quorum queues. A quorum queue is a Ra server, and Ra records the server's name in a DETS table
(``quorum/NODE/names.dets``) with DETS's default delayed write: the record stays in memory for
up to 3 s after ``queue.declare-ok``. A node killed in that window comes back without the name
and starts the queue as a new, empty Ra server that never elects a leader: the queue and every
message confirmed into it are gone, and ``basic.consume`` on it fails after ~65 s with 541
INTERNAL_ERROR. DETS writes its delayed records before any lookup, and declaring or deleting a
quorum queue looks a name up, so after creating quorum queues the backend declares and deletes a
throwaway one (``infeed:flush:<random>``, :func:`persist_quorum_names`): once that returns, the
new queues' names are in the file and survive a kill of the node.

Streams. A restarted node accepts connections before its stream coordinator has restarted each
stream's writer. Until then a stream answers 404 "home node ... is down or inaccessible" or 406
"does not have a replica on the local node" (:func:`is_stream_recovering`), and worse, a message
published to it is *confirmed and dropped* (the channel sends it to the writer of the previous
run, sees that process is gone and confirms, as for a deleted queue). So the backend retries
those replies with the reconnect backoff, and before the first publish to a stream on each new
connection it waits until a passive declare of the stream succeeds (:func:`check_stream`): from
then on the queue record names the live writer and publishes reach it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pika.exceptions

from infeed.brokers._rabbitmq_io import Chan

#: Prefix of the throwaway quorum queues (``:`` cannot occur in a topic, so no clash).
FLUSH_PREFIX = "infeed:flush:"
#: A throwaway left behind by a client that died between declare and delete expires after this.
_FLUSH_EXPIRES_MS = 60_000
_NOT_FOUND = 404
_PRECONDITION_FAILED = 406


def queues_exist(chan: Chan, names: Sequence[str]) -> bool:
    """True if every queue in ``names`` exists (a passive declare; a 404 closes ``chan``)."""
    for name in names:
        try:
            chan.sync(f"checking {name!r}", chan.impl.queue_declare, name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == _NOT_FOUND and not is_stream_recovering(exc):
                return False
            raise
    return True


def persist_quorum_names(chan: Chan) -> None:
    """Make the node write the names of the quorum queues declared so far to disk (see above)."""
    name = f"{FLUSH_PREFIX}{uuid.uuid4().hex}"
    args = {"x-queue-type": "quorum", "x-expires": _FLUSH_EXPIRES_MS}
    chan.sync(
        "declaring a throwaway quorum queue", chan.impl.queue_declare, name, durable=True, arguments=args
    )
    chan.sync("deleting a throwaway quorum queue", chan.impl.queue_delete, name)


def check_stream(chan: Chan, name: str) -> None:
    """Passive declare of stream ``name``: fails with :func:`is_stream_recovering` until it runs."""
    chan.sync(f"checking stream {name!r}", chan.impl.queue_declare, name, passive=True)


def is_stream_recovering(exc: BaseException) -> bool:
    """True for the replies of a stream whose writer the restarted node has not started yet."""
    if not isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return False
    text = str(exc.reply_text)
    return (exc.reply_code == _NOT_FOUND and "is down or inaccessible" in text) or (
        exc.reply_code == _PRECONDITION_FAILED and "replica on the local node" in text
    )
