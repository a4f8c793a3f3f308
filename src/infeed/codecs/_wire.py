"""A strict msgpack reader and writer with zero-copy numpy arrays (the ext of ``_ndarray``).

Why not ``msgpack.packb`` / ``unpackb``: the C unpacker hands ``ext_hook`` a *copy* of the extension
bytes, so an array can never view the message, and its packer's ``default`` hook cannot know where in
the message an array lands, so the data cannot be aligned. Everything written here is standard
msgpack (``msgpack.unpackb`` reads it; the unit tests check both directions).

Strictness, so that any malformed input is a ``DecodeError``: map keys are str and unique, nesting is
at most MAX_DEPTH deep, lengths are checked against the bytes that remain before anything is
allocated, and nothing may follow the top-level object. The only extension type is 1 (ndarray).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from infeed.codecs._encoding import MAX_DEPTH, Unsupported
from infeed.codecs._ndarray import NDARRAY_EXT, pack_ndarray, unpack_ndarray
from infeed.errors import DecodeError

__all__ = ["pack", "unpack"]

_B = struct.Struct(">B")
_H = struct.Struct(">H")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_b = struct.Struct(">b")
_h = struct.Struct(">h")
_i = struct.Struct(">i")
_q = struct.Struct(">q")
_f = struct.Struct(">f")
_d = struct.Struct(">d")
_TAG_B = struct.Struct(">BB")
_TAG_H = struct.Struct(">BH")
_TAG_I = struct.Struct(">BI")
_TAG_Q = struct.Struct(">BQ")
_TAG_b = struct.Struct(">Bb")
_TAG_h = struct.Struct(">Bh")
_TAG_i = struct.Struct(">Bi")
_TAG_q = struct.Struct(">Bq")
_TAG_d = struct.Struct(">Bd")
_EXT_SIZES = (struct.Struct(">Bb"), struct.Struct(">Hb"), struct.Struct(">Ib"))


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack.

    Raises:
        Unsupported: a value (named by its path) cannot be encoded.
    """
    packer = _Packer()
    packer.pack(obj, 0)
    return b"".join(packer.parts)


class _Packer:
    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0  # bytes written so far: where the next part starts

    def put(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.size += len(chunk)

    def pack(self, obj: Any, depth: int) -> None:
        t = type(obj)
        if t is str:
            self.pack_str(obj)
        elif t is int:
            self.pack_int(obj)
        elif t is float:
            self.put(_TAG_d.pack(0xCB, obj))
        elif t is np.ndarray:
            self.pack_ndarray(obj)
        elif obj is None:
            self.put(b"\xc0")
        elif t is bool:
            self.put(b"\xc3" if obj else b"\xc2")
        elif t is dict:
            self.pack_map(obj, depth)
        elif t is list or t is tuple:
            self.pack_list(obj, depth)
        elif t is bytes:
            self.pack_bin(obj)
        # Subclasses, in an order that keeps np.str_ a str and np.float64 a numpy scalar.
        elif isinstance(obj, str):
            self.pack_str(obj)
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.pack_bin(bytes(obj))
        elif isinstance(obj, (np.ndarray, np.generic)):
            self.pack_ndarray(obj)
        elif isinstance(obj, int):
            self.pack_int(int(obj))
        elif isinstance(obj, float):
            self.put(_TAG_d.pack(0xCB, obj))
        elif isinstance(obj, Mapping):
            self.pack_map(obj, depth)
        elif isinstance(obj, (list, tuple)):
            self.pack_list(obj, depth)
        else:
            raise Unsupported(f"values of type {t.__qualname__} are not supported")

    def pack_str(self, s: str) -> None:
        try:
            data = s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Unsupported(f"str is not valid unicode ({exc.reason})") from None
        n = len(data)
        if n < 32:
            self.put(_B.pack(0xA0 | n) + data)
            return
        if n <= 0xFF:
            self.put(_TAG_B.pack(0xD9, n))
        elif n <= 0xFFFF:
            self.put(_TAG_H.pack(0xDA, n))
        elif n <= 0xFFFFFFFF:
            self.put(_TAG_I.pack(0xDB, n))
        else:
            raise Unsupported(f"a str of {n} bytes is over the msgpack limit of 4 GiB")
        self.put(data)

    def pack_bin(self, data: bytes) -> None:
        n = len(data)
        if n <= 0xFF:
            self.put(_TAG_B.pack(0xC4, n))
        elif n <= 0xFFFF:
            self.put(_TAG_H.pack(0xC5, n))
        elif n <= 0xFFFFFFFF:
            self.put(_TAG_I.pack(0xC6, n))
        else:
            raise Unsupported(f"bytes of length {n} are over the msgpack limit of 4 GiB")
        self.put(data)

    def pack_int(self, v: int) -> None:
        if 0 <= v:
            if v < 0x80:
                self.put(_B.pack(v))
            elif v <= 0xFF:
                self.put(_TAG_B.pack(0xCC, v))
            elif v <= 0xFFFF:
                self.put(_TAG_H.pack(0xCD, v))
            elif v <= 0xFFFFFFFF:
                self.put(_TAG_I.pack(0xCE, v))
            elif v <= 0xFFFFFFFFFFFFFFFF:
                self.put(_TAG_Q.pack(0xCF, v))
            else:
                raise Unsupported(f"int {v} is over the 64-bit range of msgpack")
        elif v >= -32:
            self.put(_b.pack(v))
        elif v >= -0x80:
            self.put(_TAG_b.pack(0xD0, v))
        elif v >= -0x8000:
            self.put(_TAG_h.pack(0xD1, v))
        elif v >= -0x80000000:
            self.put(_TAG_i.pack(0xD2, v))
        elif v >= -0x8000000000000000:
            self.put(_TAG_q.pack(0xD3, v))
        else:
            raise Unsupported(f"int {v} is under the 64-bit range of msgpack")

    def pack_ndarray(self, value: np.ndarray[Any, Any] | np.generic) -> None:
        try:
            header, data = pack_ndarray(value, self.size)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        self.put(header)
        self.parts.append(data)
        self.size += len(data)

    def pack_map(self, obj: Mapping[Any, Any], depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise Unsupported(f"maps and lists nest deeper than {MAX_DEPTH} levels (a cycle?)")
        n = len(obj)
        if n < 16:
            self.put(_B.pack(0x80 | n))
        elif n <= 0xFFFF:
            self.put(_TAG_H.pack(0xDE, n))
        else:
            self.put(_TAG_I.pack(0xDF, n))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise Unsupported(f"map key {key!r} is a {type(key).__qualname__}; keys must be str")
            try:
                self.pack_str(key)
                self.pack(value, depth + 1)
            except Unsupported as exc:
                exc.path.append(key)
                raise

    def pack_list(self, obj: list[Any] | tuple[Any, ...], depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise Unsupported(f"maps and lists nest deeper than {MAX_DEPTH} levels (a cycle?)")
        n = len(obj)
        if n < 16:
            self.put(_B.pack(0x90 | n))
        elif n <= 0xFFFF:
            self.put(_TAG_H.pack(0xDC, n))
        else:
            self.put(_TAG_I.pack(0xDD, n))
        for i, value in enumerate(obj):
            try:
                self.pack(value, depth + 1)
            except Unsupported as exc:
                exc.path.append(i)
                raise


# --- reading ---------------------------------------------------------------------------------

_Buf = bytes | memoryview
_Reader = Callable[[_Buf, int, int, int], tuple[Any, int]]


def unpack(data: bytes | bytearray | memoryview) -> Any:
    """Decode one msgpack object that fills ``data`` exactly; arrays view ``data`` (zero-copy).

    Raises:
        DecodeError: ``data`` is not exactly one valid object.
    """
    buf: _Buf
    if isinstance(data, bytes):
        buf = data
    else:
        buf = memoryview(data)
        if not buf.c_contiguous:
            buf = memoryview(buf.tobytes())
        if buf.ndim != 1 or buf.format != "B":
            buf = buf.cast("B")
    end = len(buf)
    if end == 0:
        raise DecodeError("empty message")
    obj, pos = _read(buf, 0, end, 0)
    if pos != end:
        raise DecodeError(f"{end - pos} bytes follow the end of the message")
    return obj


def _read(b: _Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise DecodeError(f"message truncated at byte {pos}")
    t = b[pos]
    pos += 1
    if t < 0x80:
        return t, pos
    if t >= 0xE0:
        return t - 0x100, pos
    if t < 0x90:
        return _map(b, pos, end, t & 0x0F, depth)
    if t < 0xA0:
        return _list(b, pos, end, t & 0x0F, depth)
    if t < 0xC0:
        return _str(b, pos, end, t & 0x1F)
    return _READERS[t - 0xC0](b, pos, end, depth)


def _num(s: struct.Struct, b: _Buf, pos: int, end: int) -> tuple[Any, int]:
    if pos + s.size > end:
        raise DecodeError(f"message truncated at byte {pos}")
    return s.unpack_from(b, pos)[0], pos + s.size


def _str(b: _Buf, pos: int, end: int, n: int) -> tuple[str, int]:
    if pos + n > end:
        raise DecodeError(f"str of {n} bytes at byte {pos} runs past the end of the message")
    try:
        return str(b[pos : pos + n], "utf-8"), pos + n
    except UnicodeDecodeError as exc:
        raise DecodeError(f"str at byte {pos} is not valid UTF-8: {exc.reason}") from exc


def _bin(b: _Buf, pos: int, end: int, n: int) -> tuple[bytes, int]:
    if pos + n > end:
        raise DecodeError(f"bin of {n} bytes at byte {pos} runs past the end of the message")
    return bytes(b[pos : pos + n]), pos + n


def _ext(b: _Buf, pos: int, end: int, n: int) -> tuple[Any, int]:
    code, pos = _num(_b, b, pos, end)
    return _ext_body(b, pos, end, n, code)


def _ext_body(b: _Buf, pos: int, end: int, n: int, code: int) -> tuple[Any, int]:
    if code != NDARRAY_EXT:
        raise DecodeError(f"unknown msgpack extension type {code} (infeed only knows {NDARRAY_EXT}, ndarray)")
    if pos + n > end:
        raise DecodeError(f"extension of {n} bytes at byte {pos} runs past the end of the message")
    return unpack_ndarray(b, pos, pos + n), pos + n


def _ext_sized(size: struct.Struct) -> _Reader:
    # Length and type in one unpack: arrays are the bulk of training data.
    def read(b: _Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos + size.size > end:
            raise DecodeError(f"message truncated at byte {pos}")
        n, code = size.unpack_from(b, pos)
        return _ext_body(b, pos + size.size, end, n, code)

    return read


def _list(b: _Buf, pos: int, end: int, n: int, depth: int) -> tuple[list[Any], int]:
    if depth >= MAX_DEPTH:
        raise DecodeError(f"maps and lists nest deeper than {MAX_DEPTH} levels")
    if n > end - pos:  # every item takes at least one byte
        raise DecodeError(f"list of {n} items at byte {pos} is longer than the message")
    out = []
    for _ in range(n):
        item, pos = _read(b, pos, end, depth + 1)
        out.append(item)
    return out, pos


def _map(b: _Buf, pos: int, end: int, n: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth >= MAX_DEPTH:
        raise DecodeError(f"maps and lists nest deeper than {MAX_DEPTH} levels")
    if 2 * n > end - pos:  # every entry takes at least two bytes
        raise DecodeError(f"map of {n} entries at byte {pos} is longer than the message")
    out = {}
    for _ in range(n):
        t = b[pos] if pos < end else 0
        if 0xA0 <= t <= 0xBF:  # a short str: the usual key
            key, pos = _str(b, pos + 1, end, t & 0x1F)
        else:
            key, pos = _read(b, pos, end, depth + 1)
            if type(key) is not str:
                raise DecodeError(f"map key {key!r} before byte {pos} is not a str")
        if key in out:
            raise DecodeError(f"map key {key!r} appears twice")
        out[key], pos = _read(b, pos, end, depth + 1)
    return out, pos


def _sized(size: struct.Struct, then: Callable[[_Buf, int, int, int], tuple[Any, int]]) -> _Reader:
    def read(b: _Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
        n, pos = _num(size, b, pos, end)
        return then(b, pos, end, n)

    return read


def _sized_container(
    size: struct.Struct, then: Callable[[_Buf, int, int, int, int], tuple[Any, int]]
) -> _Reader:
    def read(b: _Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
        n, pos = _num(size, b, pos, end)
        return then(b, pos, end, n, depth)

    return read


def _fixed(s: struct.Struct) -> _Reader:
    return lambda b, pos, end, depth: _num(s, b, pos, end)


def _const(value: Any) -> _Reader:
    return lambda b, pos, end, depth: (value, pos)


def _fixext(n: int) -> _Reader:
    return lambda b, pos, end, depth: _ext(b, pos, end, n)


def _invalid(b: _Buf, pos: int, end: int, depth: int) -> tuple[Any, int]:
    raise DecodeError(f"byte 0xc1 at {pos - 1} is never used by msgpack")


_READERS: list[_Reader] = [
    _const(None),  # 0xc0
    _invalid,  # 0xc1
    _const(False),  # 0xc2
    _const(True),  # 0xc3
    _sized(_B, _bin),  # 0xc4
    _sized(_H, _bin),
    _sized(_I, _bin),
    _ext_sized(_EXT_SIZES[0]),  # 0xc7
    _ext_sized(_EXT_SIZES[1]),
    _ext_sized(_EXT_SIZES[2]),
    _fixed(_f),  # 0xca
    _fixed(_d),
    _fixed(_B),  # 0xcc
    _fixed(_H),
    _fixed(_I),
    _fixed(_Q),
    _fixed(_b),  # 0xd0
    _fixed(_h),
    _fixed(_i),
    _fixed(_q),
    _fixext(1),  # 0xd4
    _fixext(2),
    _fixext(4),
    _fixext(8),
    _fixext(16),
    _sized(_B, _str),  # 0xd9
    _sized(_H, _str),
    _sized(_I, _str),
    _sized_container(_H, _list),  # 0xdc
    _sized_container(_I, _list),
    _sized_container(_H, _map),  # 0xde
    _sized_container(_I, _map),
]
