"""One-record messages decoded many at a time: a template of the message layout, then numpy.

A producer that sends one record per message writes every message of a schema with the same bytes
but for the array data: the same map header, keys, extension headers and array headers, in the
same places. ``SingleDecoder`` parses the first message of a layout once (its *template*: where
each field's data lies, and the bytes around it), then decodes a whole receive call at once: join
the payloads into one ``(N, length)`` byte matrix, check that every message carries the template's
bytes outside the data (so it parses exactly as the template did), and slice each field's column
out of the matrix (one copy per column). No per-record dict or array object is made.

Anything else (another layout, another codec, values that are not msgpack ndarray extensions, a
field whose wire dtype or shape differs from the schema's) makes ``decode`` return None, and the
caller takes the general path, which validates record by record and dead-letters poison.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infeed.codecs import CODEC_HEADER, DEFAULT_CODEC, RECORDS_HEADER, RecordBatch, Schema
from infeed.codecs._ndarray import _DTYPE_BY_CODE, NDARRAY_EXT
from infeed.codecs.msgpack import MsgpackCodec
from infeed.errors import CodecError
from infeed.types import Delivery

__all__ = ["MAX_TEMPLATES", "SingleDecoder", "Template", "parse_template"]

#: Layouts remembered per decoder (a schema has one or a few; poison must not grow the cache).
MAX_TEMPLATES = 8

_Array = np.ndarray[Any, Any]
_EXT_HEADS = {0xC7: struct.Struct(">BB"), 0xC8: struct.Struct(">HB"), 0xC9: struct.Struct(">IB")}
_ARRAY_HEAD = struct.Struct("<BBBB")


@dataclass(frozen=True, slots=True)
class Template:
    """Where each field's data lies in messages of one layout, and the bytes that must match.

    Attributes:
        length: the message length.
        fields: field -> (start, stop) of its data bytes.
        fixed: (start, stop) of each span outside the data, in order.
        skeleton: the template's bytes at ``fixed``, concatenated.
        index: the positions of ``skeleton``'s bytes in a message.
    """

    length: int
    fields: dict[str, tuple[int, int]]
    fixed: tuple[tuple[int, int], ...]
    skeleton: _Array
    index: _Array


def _key(buf: bytes, pos: int) -> tuple[str, int] | None:
    t = buf[pos]
    if 0xA0 <= t <= 0xBF:
        n, pos = t & 0x1F, pos + 1
    elif t == 0xD9 and pos + 1 < len(buf):
        n, pos = buf[pos + 1], pos + 2
    else:
        return None
    if pos + n > len(buf):
        return None
    try:
        return buf[pos : pos + n].decode("utf-8"), pos + n
    except UnicodeDecodeError:
        return None


def _array(buf: bytes, pos: int) -> tuple[np.dtype[Any], tuple[int, ...], int, int] | None:
    """Parse an ndarray extension at ``pos``: (dtype, shape, data start, end), or None."""
    head = _EXT_HEADS.get(buf[pos])
    if head is None or pos + 1 + head.size > len(buf):
        return None
    n, code = head.unpack_from(buf, pos + 1)
    start = pos + 1 + head.size
    end = start + n
    if code != NDARRAY_EXT or end > len(buf) or n < _ARRAY_HEAD.size:
        return None
    dcode, ndim, flags, pad = _ARRAY_HEAD.unpack_from(buf, start)
    dtype = _DTYPE_BY_CODE.get(dcode)
    if dtype is None or flags & ~1 or (flags and ndim) or start + 4 + 8 * ndim + pad > end:
        return None
    shape = struct.unpack_from(f"<{ndim}Q", buf, start + 4)
    data = start + 4 + 8 * ndim + pad
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != end - data:
        return None
    return dtype, tuple(int(s) for s in shape), data, end


def parse_template(payload: bytes, schema: Schema) -> Template | None:
    """The template of ``payload``'s layout, or None when the fast path does not fit it.

    It fits a msgpack map (at most 15 entries) of exactly the schema's fields, each an ndarray
    extension of the field's own dtype and shape (not bool: its bytes need a check of their own).
    """
    if not payload or not 0x80 <= payload[0] <= 0x8F or payload[0] & 0x0F != len(schema.fields):
        return None
    pos = 1
    fields: dict[str, tuple[int, int]] = {}
    fixed: list[tuple[int, int]] = []
    span = 0
    for _ in range(payload[0] & 0x0F):
        if pos >= len(payload):
            return None
        key = _key(payload, pos)
        if key is None:
            return None
        name, pos = key
        spec = schema.fields.get(name)
        parsed = _array(payload, pos) if pos < len(payload) else None
        if spec is None or parsed is None or name in fields:
            return None
        dtype, shape, data, end = parsed
        if dtype != spec.numpy_dtype or shape != tuple(spec.shape) or dtype.kind == "b":
            return None
        fixed.append((span, data))
        fields[name] = (data, end)
        span = pos = end
    if pos != len(payload) or set(fields) != set(schema.fields):
        return None
    fixed.append((span, pos))
    index = np.concatenate([np.arange(a, b, dtype=np.intp) for a, b in fixed])
    skeleton = np.frombuffer(payload, np.uint8)[index].copy()
    return Template(len(payload), fields, tuple(fixed), skeleton, index)


class SingleDecoder:
    """Decodes the one-record msgpack messages of a receive call as one batch per partition.

    Args:
        schema: the fields every record must have (exactly).
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._templates: dict[int, Template] = {}  # by message length

    def _template(self, payload: bytes) -> Template | None:
        found = self._templates.get(len(payload))
        if found is not None and np.array_equal(
            np.frombuffer(payload, np.uint8)[found.index], found.skeleton
        ):
            return found
        found = parse_template(payload, self.schema)
        if found is not None and (len(self._templates) < MAX_TEMPLATES or len(payload) in self._templates):
            self._templates[len(payload)] = found
        return found

    def decode(self, raw: Sequence[Delivery]) -> list[tuple[list[Delivery], RecordBatch]] | None:
        """Per partition (in order of first appearance), the deliveries and their validated batch.

        Returns None unless every message is a one-record msgpack message of one layout that
        fits the schema and every record passes validation (NaN checks included).
        """
        if not raw:
            return []
        for d in raw:
            headers = d.headers
            if headers and (
                RECORDS_HEADER in headers or headers.get(CODEC_HEADER, DEFAULT_CODEC) != MsgpackCodec.name
            ):
                return None
        payloads = [bytes(d.payload) if type(d.payload) is not bytes else d.payload for d in raw]
        template = self._template(payloads[0])
        if template is None:
            return None
        length = template.length
        if any(len(p) != length for p in payloads):
            return None
        partition = raw[0].position.partition
        if all(d.position.partition == partition for d in raw):
            groups = [(list(raw), payloads)]
        else:
            by: dict[int, tuple[list[Delivery], list[bytes]]] = {}
            for d, p in zip(raw, payloads, strict=True):
                ds, ps = by.setdefault(d.position.partition, ([], []))
                ds.append(d)
                ps.append(p)
            groups = list(by.values())
        out = []
        for deliveries, group in groups:
            batch = self._batch(template, group)
            if batch is None:
                return None
            out.append((deliveries, batch))
        return out

    def _batch(self, template: Template, payloads: list[bytes]) -> RecordBatch | None:
        n = len(payloads)
        matrix = np.frombuffer(b"".join(payloads), np.uint8).reshape(n, template.length)
        if not np.array_equal(
            matrix[:, template.index], np.broadcast_to(template.skeleton, (n, len(template.index)))
        ):
            return None
        columns: dict[str, _Array] = {}
        for name, (start, stop) in template.fields.items():
            spec = self.schema.fields[name]
            column = np.ascontiguousarray(matrix[:, start:stop]).view(spec.numpy_dtype)
            columns[name] = column.reshape(n, *spec.shape)
        try:
            return self.schema.validate_batch(RecordBatch(columns, length=n))
        except (CodecError, TypeError, ValueError):  # NaN where the schema forbids it, say
            return None
