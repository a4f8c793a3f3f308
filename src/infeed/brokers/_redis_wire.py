"""Wire format of the ``redis://`` backend: key names, stream ids <-> offsets, entry fields, scripts.

Layout (``P`` is the configured key prefix, ``infeed`` by default)::

    P:topics               hash    topic -> partition count
    P:{topic}:p<N>         stream  partition N; entry ids 0-1, 0-2, ... (see below)
    P:{topic}:commits      hash    "<group>:<N>" -> committed resume id

An entry holds ``t`` (broker time, ms), ``p`` (payload), ``k`` (key, when there is one) and one
``h:<name>`` field per header. infeed appends with the id ``0-*``, so Redis numbers a partition's
entries 0-1, 0-2, 0-3, ...: dense like Kafka offsets, which keeps lag and depth exact arithmetic.
The offset of any stream id ``MS-SEQ`` is ``MS << 64 | SEQ`` (lossless both ways), so entries
written by other clients with time-based ids still map to growing offsets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

_MASK64 = (1 << 64) - 1
_SCRIPT_NAMES = ("topic", "publish", "claim", "settle", "commit", "seek", "release", "trim", "delete")


def id_to_offset(entry_id: bytes | str) -> int:
    """Pack the stream id ``MS-SEQ`` into one integer."""
    if isinstance(entry_id, str):
        entry_id = entry_id.encode()
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms) << 64) | int(seq or b"0")


def offset_to_id(offset: int) -> str:
    """Unpack an offset into its stream id."""
    return f"{offset >> 64}-{offset & _MASK64}"


def id_before(offset: int) -> str:
    """The stream id just before ``offset`` (``0-0`` for offset 0)."""
    return offset_to_id(offset - 1) if offset > 0 else "0-0"


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix."""

    prefix: str

    @property
    def topics(self) -> str:
        return f"{self.prefix}:topics"

    def stream(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{{{topic}}}:p{partition}"

    def streams(self, topic: str, partitions: int) -> list[str]:
        return [self.stream(topic, p) for p in range(partitions)]

    def commits(self, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}:commits"


def encode_fields(payload: bytes, key: bytes | None, headers: Mapping[str, str]) -> list[bytes]:
    """The field/value list of one entry (without ``t``, which the scripts add)."""
    fields = [b"p", payload]
    if key is not None:
        fields += (b"k", key)
    for name, value in headers.items():
        fields += (b"h:" + name.encode(), value.encode())
    return fields


def decode_fields(fields: list[bytes]) -> tuple[bytes, bytes | None, dict[str, str], float]:
    """Return payload, key, headers and timestamp (s) of an entry's field/value list.

    Fields that infeed does not write (from other producers) become headers under their own name.
    """
    if len(fields) == 4 and fields[0] == b"t" and fields[2] == b"p":  # no key, no headers
        return fields[3], None, {}, int(fields[1]) / 1000.0
    it = iter(fields)
    d = dict(zip(it, it, strict=True))
    payload = d.pop(b"p", b"")
    key = d.pop(b"k", None)
    raw_ts = d.pop(b"t", None)
    ts = int(raw_ts) / 1000.0 if raw_ts is not None and raw_ts.isdigit() else 0.0
    headers: dict[str, str] = {}
    for name, value in d.items():
        text = name.decode(errors="replace")
        headers[text[2:] if text.startswith("h:") else text] = value.decode(errors="replace")
    return payload, key, headers, ts


@dataclass(frozen=True)
class Script:
    """A Lua script: its text (with the shared helpers prepended) and its SHA1."""

    name: str
    text: str
    sha: str


def load_scripts() -> dict[str, Script]:
    """Read the Lua scripts shipped next to this module (package data)."""
    folder = resources.files("infeed.brokers").joinpath("redis_scripts")
    lib = folder.joinpath("_lib.lua").read_text(encoding="utf-8")
    out = {}
    for name in _SCRIPT_NAMES:
        text = lib + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        out[name] = Script(name, text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())
    return out
