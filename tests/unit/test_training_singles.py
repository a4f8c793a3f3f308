"""SingleDecoder: many one-record messages decoded at once, or refused so the general path runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from infeed.codecs import (
    Field,
    JsonCodec,
    MsgpackCodec,
    RecordBatch,
    Schema,
    default_registry,
    encode_message,
)
from infeed.training._chunks import decode_singles
from infeed.training._singles import SingleDecoder, parse_template
from infeed.types import Delivery, Position

SCHEMA = Schema({"x": Field("float32", (5,)), "y": Field("int64"), "m": Field("uint8", (2, 3))})


def record(i: int, **change: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "x": np.arange(5, dtype=np.float32) + i,
        "y": np.int64(i),
        "m": np.full((2, 3), i % 256, np.uint8),
    }
    rec.update(change)
    return rec


def delivery(rec: dict[str, Any], offset: int, partition: int = 0, codec: Any = None) -> Delivery:
    payload, headers = encode_message(codec or MsgpackCodec(), rec)
    return Delivery(payload, None, headers, Position("t", partition, offset), 1, 0.0, None)


def test_many_messages_decode_to_the_general_paths_batch() -> None:
    raw = [delivery(record(i), i) for i in range(40)]
    fast = SingleDecoder(SCHEMA).decode(raw)
    slow = decode_singles(raw, default_registry(), SCHEMA)
    assert fast is not None and slow is not None and len(fast) == len(slow) == 1
    (fast_ds, fast_batch), (slow_ds, slow_batch) = fast[0], slow[0]
    assert fast_ds == slow_ds
    for name in SCHEMA.fields:
        got, want = fast_batch.columns[name], slow_batch.columns[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
        assert got.flags.writeable and got.flags.c_contiguous


def test_partitions_come_apart_in_order_of_first_appearance() -> None:
    raw = [delivery(record(i), i, partition=[1, 0][i % 2]) for i in range(6)]
    out = SingleDecoder(SCHEMA).decode(raw)
    assert out is not None
    assert [[d.position.partition for d in ds] for ds, _ in out] == [[1, 1, 1], [0, 0, 0]]
    assert out[0][1].columns["y"].tolist() == [0, 2, 4] and out[1][1].columns["y"].tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    "odd",
    [
        record(7, x=np.array([0, 1, np.nan, 3, 4], np.float32)),  # NaN: the schema forbids it
        record(7, x=np.arange(5, dtype=np.float64)),  # another dtype, so another layout
        record(7, y=7),  # a msgpack int, not an ndarray extension
        {k: v for k, v in record(7).items() if k != "m"},  # a field missing
        {**record(7), "extra": np.int64(1)},  # a field too many
    ],
)
def test_any_odd_message_sends_the_call_down_the_general_path(odd: dict[str, Any]) -> None:
    decoder = SingleDecoder(SCHEMA)
    assert decoder.decode([delivery(record(i), i) for i in range(3)]) is not None  # the layout is known
    assert decoder.decode([delivery(record(i), i) for i in range(3)] + [delivery(odd, 3)]) is None
    assert decoder.decode([delivery(odd, 0)]) is None


def test_bytes_outside_the_data_must_match_the_template() -> None:
    good = delivery(record(1), 0)
    assert isinstance(good.payload, bytes)
    template = parse_template(good.payload, SCHEMA)
    assert template is not None and set(template.fields) == {"x", "y", "m"}
    start, _ = template.fields["y"]
    tampered = bytearray(good.payload)
    tampered[start - 1] ^= 0xFF  # a byte of the array header before y's data (its pad or shape)
    other = Delivery(bytes(tampered), None, good.headers, Position("t", 0, 1), 1, 0.0, None)
    assert SingleDecoder(SCHEMA).decode([good, other]) is None


def test_other_codecs_and_record_batches_are_left_to_the_general_path() -> None:
    decoder = SingleDecoder(SCHEMA)
    as_json = delivery({"x": [0.0] * 5, "y": 1, "m": [[0] * 3] * 2}, 0, codec=JsonCodec())
    assert decoder.decode([as_json]) is None
    batch = RecordBatch({name: np.stack([record(i)[name] for i in range(2)]) for name in SCHEMA.fields})
    payload, headers = encode_message(MsgpackCodec(), batch)
    assert decoder.decode([Delivery(payload, None, headers, Position("t", 0, 0), 1, 0.0, None)]) is None
    assert decoder.decode([]) == []


def test_offsets_too_big_for_int64_stay_exact() -> None:
    """Pulsar packs a message id into one offset (ledger << 64 | ...): beyond int64, kept exact."""
    from infeed.training._chunks import offsets_array

    small = offsets_array([1, 2, 3])
    assert small.dtype == np.int64
    huge = [7 << 64 | 5 << 20, 7 << 64 | 6 << 20]
    out = offsets_array(huge)
    assert [int(v) for v in out + 1] == [h + 1 for h in huge]
    assert offsets_array([]).dtype == np.int64
