"""The scoring frontier: which input messages are scored, read back from the output topic.

Every output message a scorer publishes carries, in the ``x-infeed-score-frontier`` header, the
input topic and, per input partition, the offset just past the last input message handled when
that output was written. The output topic is the only record of what is done, so recovery is: read
the last message of the scorer's output partition, take its frontier, seek the input there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from infeed.brokers.base import Broker
from infeed.errors import BrokerError, ConfigError
from infeed.types import Capability, Delivery, Position

__all__ = ["FRONTIER_HEADER", "INPUT_HEADER", "decode_frontier", "encode_frontier", "read_frontier"]

#: Header of an output message: ``{"topic": input topic, "next": {partition: offset}}`` (JSON).
FRONTIER_HEADER = "x-infeed-score-frontier"
#: Header of an output message: the position of the input message it scores.
INPUT_HEADER = "x-infeed-score-input"
#: How long one receive waits while reading the output partition's tail.
DEFAULT_TAIL_RECEIVE_S = 2.0


def encode_frontier(topic: str, next_offsets: Mapping[int, int]) -> str:
    """Return the header value for ``topic``'s resume offsets per partition."""
    return json.dumps({"topic": topic, "next": {str(p): o for p, o in sorted(next_offsets.items())}})


def decode_frontier(value: str) -> tuple[str, dict[int, int]]:
    """Return (input topic, partition -> resume offset) from a header value.

    Raises:
        ValueError: the value is not a frontier.
    """
    try:
        data = json.loads(value)
        topic, offsets = data["topic"], data["next"]
        out = {int(p): o for p, o in offsets.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a scoring frontier: {value[:200]!r}") from exc
    if not isinstance(topic, str) or not all(type(o) is int and o >= 0 for o in out.values()):
        raise ValueError(f"not a scoring frontier: {value[:200]!r}")
    return topic, out


def _last_message(broker: Broker, topic: str, partition: int, group: str) -> Delivery | None:
    part = broker.describe_topic(topic).partitions[partition]
    if part.depth == 0:
        return None
    consumer = broker.subscribe(topic, group=group, partitions=[partition])
    try:
        window = 1
        while True:  # offsets may be sparse (Redis ids, Kafka): widen until a message is seen
            start = max(part.low, part.high - window)
            consumer.seek(Position(topic, partition, start))
            last: Delivery | None = None
            while True:
                got = consumer.receive(max_messages=1000, timeout_s=DEFAULT_TAIL_RECEIVE_S)
                if not got:
                    break
                last = got[-1]
                if last.position.offset >= part.high - 1:
                    break
            if last is not None:
                if broker.supports(Capability.OFFSET_COMMIT):  # so the tail group shows no lag
                    consumer.commit(Position(topic, partition, part.high))
                return last
            if start <= part.low:
                raise BrokerError(
                    f"{topic} partition {partition} holds {part.depth} messages but none could be read"
                )
            window *= 16
    finally:
        consumer.close()


def read_frontier(
    broker: Broker, out_topic: str, out_partition: int, in_topic: str, *, group: str
) -> dict[int, int] | None:
    """Return the input resume offsets recorded by the last message of the output partition.

    Args:
        broker: where the output topic is.
        out_topic: the output topic.
        out_partition: the partition this scorer writes.
        in_topic: the input topic the frontier must be about.
        group: the consumer group used to read the tail (its own, apart from the input's group).

    Returns:
        Partition -> offset of the first input message not yet scored; None when the output
        partition is empty (nothing scored yet).

    Raises:
        ConfigError: the last message was not written by a scorer of ``in_topic``.
    """
    last = _last_message(broker, out_topic, out_partition, group)
    if last is None:
        return None
    value = last.headers.get(FRONTIER_HEADER)
    if value is None:
        raise ConfigError(
            f"the last message of {out_topic} partition {out_partition} ({last.position}) has no "
            f"{FRONTIER_HEADER} header: something other than a scorer writes there; give the "
            "scorer an output topic (or --out-partition) of its own"
        )
    topic, offsets = decode_frontier(value)
    if topic != in_topic:
        raise ConfigError(
            f"{out_topic} partition {out_partition} holds the scores of input topic {topic!r}, "
            f"not {in_topic!r}; give each input its own output topic or partition"
        )
    return offsets
