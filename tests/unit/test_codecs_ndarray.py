"""The msgpack ndarray extension (ext type 1): round trips, zero-copy, allowlist, malformed payloads."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infeed.codecs import DTYPE_CODES, NDARRAY_EXT, MsgpackCodec
from infeed.errors import DecodeError, EncodeError

SETTINGS = settings(max_examples=60, deadline=None, database=None)
CODEC = MsgpackCodec()


def shares(arr: np.ndarray[Any, Any], payload: bytes | bytearray) -> bool:
    return bool(np.shares_memory(arr, np.frombuffer(payload, np.uint8)))


def same(decoded: Any, original: np.ndarray[Any, Any]) -> None:
    """Bit-exact equality, with the dtype converted to little-endian."""
    assert isinstance(decoded, np.ndarray)
    want = original.astype(original.dtype.newbyteorder("<"))
    assert decoded.dtype == want.dtype
    assert decoded.shape == want.shape
    assert decoded.tobytes() == want.tobytes()


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(st.sampled_from(list(DTYPE_CODES)))).newbyteorder(draw(st.sampled_from("<>")))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "transposed", "strided"]))
    if layout == "transposed":
        return arr.T
    if layout == "strided" and arr.ndim:
        return arr[..., ::2]
    return arr


@SETTINGS
@given(arrays())
def test_arrays_of_every_allowed_dtype_and_shape_round_trip(arr: np.ndarray[Any, Any]) -> None:
    payload = CODEC.encode({"a": arr})
    decoded = CODEC.decode(payload)["a"]
    same(decoded, arr)
    assert not decoded.flags.writeable
    if decoded.size:
        assert shares(decoded, payload)


@SETTINGS
@given(st.sampled_from(list(DTYPE_CODES)).flatmap(lambda name: hnp.from_dtype(np.dtype(name))))
def test_numpy_scalars_round_trip_as_numpy_scalars(value: Any) -> None:
    scalar = np.asarray(value)[()]
    decoded = CODEC.decode(CODEC.encode({"s": scalar}))["s"]
    assert type(decoded) is type(scalar)
    assert np.asarray(decoded).tobytes() == np.asarray(scalar).tobytes()


def test_zero_d_array_stays_an_array() -> None:
    decoded = CODEC.decode(CODEC.encode({"a": np.array(2.5, dtype=np.float32)}))["a"]
    assert isinstance(decoded, np.ndarray)
    assert decoded.shape == ()
    assert decoded == np.float32(2.5)


def test_decode_is_zero_copy_and_read_only() -> None:
    x = np.random.default_rng(0).random(784, dtype=np.float32)
    payload = CODEC.encode({"x": x, "y": np.int64(7)})
    decoded = CODEC.decode(payload)["x"]
    assert shares(decoded, payload)
    assert not decoded.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        decoded[0] = 1.0
    np.testing.assert_array_equal(decoded, x)


@pytest.mark.parametrize("wrap", [lambda raw: raw, memoryview], ids=["bytearray", "memoryview"])
def test_zero_copy_from_other_buffers_and_still_read_only(wrap: Any) -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    raw = bytearray(CODEC.encode({"x": x}))
    decoded = CODEC.decode(wrap(raw))["x"]
    assert shares(decoded, raw)
    assert not decoded.flags.writeable  # even though a bytearray is writable
    np.testing.assert_array_equal(decoded, x)


@SETTINGS
@given(st.text(max_size=40), st.lists(st.integers(0, 3), max_size=3))
def test_data_starts_aligned_from_the_message_start(key: str, prefix: list[int]) -> None:
    payload = CODEC.encode({key: prefix, "k" + key: np.arange(5, dtype=np.float64)})
    decoded = CODEC.decode(payload)["k" + key]
    offset = decoded.ctypes.data - np.frombuffer(payload, np.uint8).ctypes.data
    assert offset % 8 == 0


def test_big_endian_and_fortran_order_input_round_trip() -> None:
    arr = np.arange(24, dtype=">f8").reshape(2, 3, 4)
    decoded = CODEC.decode(CODEC.encode({"a": arr, "f": np.asfortranarray(arr)}))
    assert decoded["a"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(decoded["a"], arr)
    np.testing.assert_array_equal(decoded["f"], arr)


@pytest.mark.parametrize(
    "value",
    [
        np.array([object()], dtype=object),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
        np.array(["text"]),
        np.array([b"bytes"]),
        np.array([1 + 2j]),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
        np.zeros(2, dtype="V4"),
        np.datetime64("2024-01-01"),
        np.complex64(1),
    ],
    ids=lambda v: str(np.asarray(v).dtype),
)
def test_disallowed_dtypes_raise_encode_error_naming_field_and_dtype(value: Any) -> None:
    with pytest.raises(EncodeError, match=r"field 'batch\.col'.*dtype"):
        CODEC.encode({"batch": {"col": value}})


def test_longdouble_is_not_allowed_where_it_differs_from_float64() -> None:
    if np.dtype(np.longdouble) == np.dtype(np.float64):
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(EncodeError, match="dtype"):
        CODEC.encode({"a": np.zeros(2, dtype=np.longdouble)})


def test_masked_arrays_are_refused_rather_than_unmasked() -> None:
    masked = np.ma.masked_array([1.0, 2.0], mask=[False, True])
    with pytest.raises(EncodeError, match="field 'm': masked arrays"):
        CODEC.encode({"m": masked})


def test_more_than_32_dimensions_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="33"):
        CODEC.encode({"a": np.zeros((1,) * 33)})


def ext_message(payload: bytes, code: int = NDARRAY_EXT) -> bytes:
    """``{"a": ext}`` with the extension as ext 32, built by hand."""
    return b"\x81\xa1a" + struct.pack(">BIb", 0xC9, len(payload), code) + payload


def header(code: int, shape: tuple[int, ...], flags: int = 0, pad: int = 0) -> bytes:
    return struct.pack(f"<BBBB{len(shape)}Q", code, len(shape), flags, pad, *shape) + bytes(pad)


F32 = DTYPE_CODES["float32"]


def test_a_hand_built_extension_decodes_as_documented() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    decoded = CODEC.decode(ext_message(header(F32, (2, 3), pad=3) + data))["a"]
    np.testing.assert_array_equal(decoded, np.arange(6, dtype=np.float32).reshape(2, 3))
    scalar = CODEC.decode(ext_message(header(DTYPE_CODES["int16"], (), flags=1) + b"\x05\x00"))["a"]
    assert type(scalar) is np.int16
    assert scalar == 5


def test_encoded_messages_are_standard_msgpack() -> None:
    payload = CODEC.encode({"x": np.ones((2, 2), dtype=np.uint8), "n": 1})
    decoded = msgpack.unpackb(payload, ext_hook=lambda code, data: (code, bytes(data)))
    code, data = decoded["x"]
    assert code == NDARRAY_EXT
    assert data[:4] == bytes([DTYPE_CODES["uint8"], 2, 0, data[3]])
    assert data[-4:] == b"\x01" * 4
    assert decoded["n"] == 1


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "shorter than its 4-byte header"),
        (b"\x0b\x01\x00", "shorter than its 4-byte header"),
        (header(0, (1,)) + bytes(4), "dtype code 0"),
        (header(13, (1,)) + bytes(4), "dtype code 13"),
        (header(255, ()) + bytes(8), "dtype code 255"),
        (struct.pack("<BBBB", F32, 33, 0, 0) + bytes(8 * 33 + 4), "33 dimensions"),
        (header(F32, (1,), flags=2) + bytes(4), "flags"),
        (header(F32, (1,), flags=1) + bytes(4), "flags"),
        (header(F32, (3,)) + bytes(8), "needs 12 bytes"),
        (header(F32, (1,)) + bytes(8), "needs 4 bytes"),
        (header(F32, (2**64 - 1, 2**64 - 1)) + bytes(16), "needs"),
        (header(F32, (2**32, 2**32)) + bytes(0), "needs"),
        (header(F32, (0, 2**64 - 1)), "not valid"),
        (header(F32, (0, 2**62, 2**62)), "not valid"),
        (struct.pack("<BBBBQ", F32, 1, 0, 200, 1) + bytes(4), "longer than its"),
        (struct.pack("<BBBB", F32, 2, 0, 0) + bytes(8), "longer than its|needs"),
        (header(DTYPE_CODES["bool"], (2,)) + b"\x01\x02", "bool"),
    ],
)
def test_malformed_extensions_raise_decode_error(payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        CODEC.decode(ext_message(payload))


@pytest.mark.parametrize("code", [-1, 0, 2, 127])
def test_unknown_extension_codes_raise_decode_error(code: int) -> None:
    with pytest.raises(DecodeError, match=f"unknown msgpack extension type {code}"):
        CODEC.decode(ext_message(b"\x00" * 8, code=code))
