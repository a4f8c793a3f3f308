"""The msgpack extension that carries one numpy array or numpy scalar: ext type 1.

Payload of the extension (integers little-endian)::

    offset      size      field
    0           1         dtype code, from DTYPE_CODES (an allowlist; any other code is refused)
    1           1         ndim, 0..MAX_NDIM
    2           1         flags: bit 0 = a numpy scalar (ndim is then 0); the other bits must be 0
    3           1         pad: how many zero bytes sit between the shape and the data
    4           8 * ndim  shape, one uint64 per dimension
    4 + 8*ndim  pad       zero bytes, chosen so the data starts ALIGN-aligned from the message start
    ...         nbytes    the elements in C order, little-endian; nbytes == prod(shape) * itemsize

The encoder converts big-endian and non-contiguous arrays. The decoder is ``np.frombuffer`` on the
message itself: the array shares the message's memory (zero-copy), is read-only, and keeps the
message alive. Object, void, datetime, string and complex dtypes never travel, so decoding never
runs code and never unpickles.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from infeed.errors import DecodeError

__all__ = [
    "ALIGN",
    "DTYPE_CODES",
    "MAX_NDIM",
    "NDARRAY_EXT",
    "allowed_dtype",
    "pack_ndarray",
    "unpack_ndarray",
]

#: msgpack extension type code of an ndarray / numpy scalar.
NDARRAY_EXT = 1
#: Most dimensions an array on the wire may have.
MAX_NDIM = 32
#: Array data starts at a multiple of this many bytes from the start of the message.
ALIGN = 8
#: The dtype allowlist: name -> wire code. Codes are part of the wire format; never renumber.
DTYPE_CODES: dict[str, int] = {
    "bool": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "uint8": 6,
    "uint16": 7,
    "uint32": 8,
    "uint64": 9,
    "float16": 10,
    "float32": 11,
    "float64": 12,
}

_DTYPE_BY_CODE: dict[int, np.dtype[Any]] = {
    code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()
}
_CODE_BY_DTYPE: dict[np.dtype[Any], int] = {dt: code for code, dt in _DTYPE_BY_CODE.items()}
_HEAD = struct.Struct("<BBBB")
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]
_EXT8 = struct.Struct(">BBb")
_EXT16 = struct.Struct(">BHb")
_EXT32 = struct.Struct(">BIb")
_ALLOWED = ", ".join(DTYPE_CODES)


def allowed_dtype(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """Return the little-endian wire dtype for ``dtype``, or None when it is not allowlisted."""
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None and dtype.byteorder == ">":
        code = _CODE_BY_DTYPE.get(dtype.newbyteorder("<"))
    return None if code is None else _DTYPE_BY_CODE[code]


def pack_ndarray(value: np.ndarray[Any, Any] | np.generic, position: int) -> tuple[bytes, memoryview]:
    """Return the ext header (with the array header) and the data, for an ext written at ``position``.

    Raises:
        ValueError: the dtype is not allowlisted, or the array has too many dimensions or bytes.
    """
    if isinstance(value, np.ma.MaskedArray):  # np.asarray would drop the mask and send the raw values
        raise ValueError("masked arrays are not supported; fill them first (arr.filled(value))")
    arr = np.asarray(value)
    dtype = allowed_dtype(arr.dtype)
    if dtype is None:
        raise ValueError(f"dtype {arr.dtype} is not allowed on the wire (allowed: {_ALLOWED})")
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"an array has at most {MAX_NDIM} dimensions on the wire, got {arr.ndim}")
    arr = np.asarray(arr, dtype=dtype, order="C")
    head_len = 4 + 8 * arr.ndim
    longest = head_len + ALIGN - 1 + arr.nbytes
    # The ext header's size must be fixed before the pad is known: size it for the largest pad.
    if longest <= 0xFF:
        tag, ext = 0xC7, _EXT8
    elif longest <= 0xFFFF:
        tag, ext = 0xC8, _EXT16
    elif longest <= 0xFFFFFFFF:
        tag, ext = 0xC9, _EXT32
    else:
        raise ValueError(f"an array of {arr.nbytes} bytes is over the 4 GiB msgpack extension limit")
    pad = -(position + ext.size + head_len) % ALIGN
    header = b"".join(
        (
            ext.pack(tag, head_len + pad + arr.nbytes, NDARRAY_EXT),
            _HEAD.pack(_CODE_BY_DTYPE[dtype], arr.ndim, isinstance(value, np.generic), pad),
            _SHAPES[arr.ndim].pack(*arr.shape),
            bytes(pad),
        )
    )
    return header, arr.reshape(-1).view(np.uint8).data


def unpack_ndarray(buf: bytes | memoryview, start: int, end: int) -> np.ndarray[Any, Any] | np.generic:
    """Decode the ext payload ``buf[start:end]`` as a read-only array viewing ``buf``.

    Raises:
        DecodeError: the header is malformed or the data length does not match the shape.
    """
    if end - start < _HEAD.size:
        raise DecodeError(f"ndarray extension of {end - start} bytes is shorter than its 4-byte header")
    code, ndim, flags, pad = _HEAD.unpack_from(buf, start)
    dtype = _DTYPE_BY_CODE.get(code)
    if dtype is None:
        raise DecodeError(f"ndarray dtype code {code} is not in the allowlist (1..{len(DTYPE_CODES)})")
    if ndim > MAX_NDIM:
        raise DecodeError(f"ndarray has {ndim} dimensions, at most {MAX_NDIM} are allowed")
    if flags & ~1 or (flags and ndim):
        raise DecodeError(f"ndarray flags 0x{flags:02x} are invalid for ndim {ndim}")
    data_start = start + _HEAD.size + 8 * ndim + pad
    if data_start > end:
        raise DecodeError(
            f"ndarray header of {data_start - start} bytes is longer than its {end - start}-byte payload"
        )
    shape = _SHAPES[ndim].unpack_from(buf, start + _HEAD.size)
    count = math.prod(shape)  # Python ints: no overflow, so a lying shape cannot wrap around
    if count * dtype.itemsize != end - data_start:
        raise DecodeError(
            f"ndarray of shape {shape} and dtype {dtype.name} needs {count * dtype.itemsize} bytes, "
            f"the message holds {end - data_start}"
        )
    if dtype.kind == "b" and count and np.frombuffer(buf, np.uint8, count, data_start).max() > 1:
        raise DecodeError("bool ndarray holds bytes other than 0 and 1")
    arr = np.frombuffer(buf, dtype, count, data_start)
    if flags:
        return arr[0]  # type: ignore[no-any-return]
    if ndim != 1:
        try:
            arr = arr.reshape(shape)
        except ValueError as exc:  # a zero-size shape with dimensions numpy cannot index
            raise DecodeError(f"ndarray shape {shape} is not valid: {exc}") from exc
    if type(buf) is not bytes:  # a view of bytes is read-only already; of a bytearray it is not
        arr.flags.writeable = False
    return arr
