"""Positions: validation, text and JSON forms, ordering (property-based)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infeed.types import Delivery, Position, trusted_delivery, trusted_position

topics = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=30)
positions = st.builds(
    Position,
    topics,
    st.integers(0, 1000),
    st.integers(0, 2**130),
    st.integers(0, 10_000),
)


@given(positions)
def test_json_round_trip(p: Position) -> None:
    assert Position.from_json(p.to_json()) == p


@given(positions)
def test_text_round_trip(p: Position) -> None:
    assert Position.parse(str(p)) == p


@given(positions, positions)
def test_order_follows_partition_then_offset_within_a_topic(a: Position, b: Position) -> None:
    b = Position(a.topic, b.partition, b.offset, b.record)
    assert (a < b) == ((a.partition, a.offset, a.record) < (b.partition, b.offset, b.record))


@pytest.mark.parametrize(
    "bad",
    [
        {"topic": "t", "partition": "0", "offset": 1},
        {"topic": "t", "offset": 1},
        {"topic": 3, "partition": 0, "offset": 0},
    ],
)
def test_bad_json_is_named(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Position.from_json(bad)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError, match="offset"):
        Position("t", 0, -1)
    with pytest.raises(ValueError, match="partition"):
        Position("t", -1, 0)
    with pytest.raises(ValueError, match="bad position"):
        Position.parse("t:x")
    with pytest.raises(ValueError, match="without ':'"):
        Position("a:b", 0, 0)


def test_next_position_is_just_after() -> None:
    d = Delivery(b"x", None, {}, Position("t", 2, 41))
    assert d.next_position == Position("t", 2, 42)
    assert (d.topic, d.partition) == ("t", 2)


@given(st.text(min_size=1).filter(lambda t: ":" not in t), st.integers(0, 2**20), st.integers(0, 2**80))
def test_trusted_constructors_build_what_the_checked_ones_do(topic: str, partition: int, offset: int) -> None:
    position = trusted_position(topic, partition, offset)
    assert position == Position(topic, partition, offset)
    assert hash(position) == hash(Position(topic, partition, offset))
    assert position.record == 0
    delivery = trusted_delivery(b"p", b"k", {"h": "v"}, position, 3, 1.5, "receipt")
    assert delivery == Delivery(b"p", b"k", {"h": "v"}, Position(topic, partition, offset), 3, 1.5, "other")
    assert delivery.receipt == "receipt"
    assert delivery.next_position == Position(topic, partition, offset + 1)
    with pytest.raises(AttributeError):  # still frozen
        delivery.payload = b"x"  # type: ignore[misc]
