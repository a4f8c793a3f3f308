"""How an infeed message looks on AMQP 0-9-1 (shared by the publisher and both consumer models).

* ``message_id``: the publish stamp, in decimal (see ``rabbitmq``: the queue model's offset).
* ``delivery_mode=2`` (persistent), ``priority`` where the topic has priorities.
* headers: the caller's str -> str headers, plus ``x-infeed-amqp-key`` (bytes) when there is a key
  and ``x-infeed-amqp-count`` (deliveries counted before the backend republished the message).
  A message with neither key nor headers carries no header table at all (cheaper to encode).

Broker-added headers (``x-delivery-count`` of quorum queues, ``x-stream-offset`` of streams) and
the internal ones are removed before the caller sees a delivery.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pika

H_KEY = "x-infeed-amqp-key"
H_COUNT = "x-infeed-amqp-count"
_HIDDEN = (H_KEY, H_COUNT, "x-delivery-count", "x-stream-offset")


def properties(stamp: int, key: bytes | None, headers: dict[str, Any], priority: int | None) -> Any:
    """Properties of a new message (``headers`` is the caller's copy; it is extended in place)."""
    if key is not None:
        headers[H_KEY] = key
    return pika.BasicProperties(
        delivery_mode=2, message_id=str(stamp), headers=headers or None, priority=priority
    )


def priority(headers: dict[str, Any], max_priority: int) -> int | None:
    """AMQP priority from the caller's ``priority`` header (topics with ``max_priority`` only)."""
    raw = headers.get("priority")
    if not max_priority or not isinstance(raw, str):
        return None
    try:
        return max(0, min(int(raw), max_priority))
    except ValueError:
        return None


def recount(props: Any, counted: int) -> Any:
    """Properties of a republished copy that has been delivered ``counted`` times already."""
    headers = dict(props.headers or {})
    headers[H_COUNT] = counted
    headers.pop("x-delivery-count", None)
    headers.pop("x-stream-offset", None)
    return pika.BasicProperties(
        delivery_mode=2, message_id=props.message_id, headers=headers, priority=props.priority
    )


class Decoded(NamedTuple):
    stamp: int
    key: bytes | None
    headers: dict[str, str]
    #: deliveries counted before a republish
    prior: int
    #: quorum queues' x-delivery-count (None on classic queues)
    broker_count: int | None
    #: streams' x-stream-offset (None on queues)
    stream_offset: int | None


def decode(props: Any) -> Decoded:
    """Split a delivery's properties into what infeed reports (``props`` is left as it is)."""
    mid = props.message_id
    stamp = int(mid) if mid and mid.isdigit() else 0
    raw = props.headers
    if not raw:
        return Decoded(stamp, None, {}, 0, None, None)
    key = raw.get(H_KEY)
    count = raw.get("x-delivery-count")
    offset = raw.get("x-stream-offset")
    headers = {k: v if isinstance(v, str) else _text(v) for k, v in raw.items() if k not in _HIDDEN}
    return Decoded(
        stamp,
        key.encode() if isinstance(key, str) else key,
        headers,
        int(raw.get(H_COUNT, 0)),
        None if count is None else int(count),
        None if offset is None else int(offset),
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
