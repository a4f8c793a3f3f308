"""A dataset's resumable state in safe formats: JSON for positions and counters, safetensors for records.

``QueueDataset.state_dict()`` returns ``{"meta": {...}, "arrays": {...}}``: ``meta`` is JSON-safe
(positions per partition as message offset + record index, epoch bounds, counters, the shuffle
generator's state) and ``arrays`` holds the shuffle buffer's records by field. :func:`encode_state`
and :func:`decode_state` turn that into two files' bytes and back; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from infeed.types import Position

__all__ = [
    "STATE_FORMAT",
    "check_meta",
    "decode_positions",
    "decode_state",
    "encode_positions",
    "encode_state",
]

#: The ``format`` value of a dataset state this version writes and reads.
STATE_FORMAT = "infeed.queue-dataset/1"


def encode_positions(positions: Mapping[int, Position]) -> list[dict[str, Any]]:
    """Positions by partition as a JSON-safe list, sorted by partition."""
    return [positions[p].to_json() for p in sorted(positions)]


def decode_positions(data: Any) -> dict[int, Position]:
    """Read what :func:`encode_positions` wrote.

    Raises:
        ValueError: not a list of positions, or one partition twice.
    """
    if not isinstance(data, list):
        raise ValueError(f"positions must be a list, got {type(data).__name__}")
    out: dict[int, Position] = {}
    for item in data:
        pos = Position.from_json(item)
        if pos.partition in out:
            raise ValueError(f"partition {pos.partition} has two positions in the state")
        out[pos.partition] = pos
    return out


def check_meta(
    meta: Mapping[str, Any], *, topic: str, fields: Mapping[str, Any], shuffle_buffer: int
) -> None:
    """Refuse a state's ``meta`` of another format, topic, schema or shuffle buffer size than the dataset's.

    Args:
        meta: the state's ``meta``.
        topic: the topic the loading dataset reads.
        fields: its schema's ``to_dict()``.
        shuffle_buffer: its shuffle buffer's size.

    Raises:
        ValueError: naming what differs.
    """
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"not a QueueDataset state (format {meta.get('format')!r})")
    if meta["topic"] != topic:
        raise ValueError(f"the state is of topic {meta['topic']!r}, this dataset reads {topic!r}")
    if meta["fields"] != fields:
        raise ValueError(f"the state's fields {meta['fields']} differ from the schema's")
    if meta["shuffle_buffer"] != shuffle_buffer:
        raise ValueError(
            f"the state has a shuffle buffer of {meta['shuffle_buffer']}, "
            f"this dataset one of {shuffle_buffer}"
        )


def encode_state(state: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Return the JSON bytes of ``state["meta"]`` and the safetensors bytes of ``state["arrays"]``.

    Raises:
        TypeError: ``meta`` holds something JSON cannot carry, or an array is not a numpy array.
    """
    meta, arrays = state["meta"], state["arrays"]
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise TypeError(f"state array {name!r} is a {type(array).__name__}, not a numpy array")
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode(), st_save({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def decode_state(meta: bytes, arrays: bytes) -> dict[str, Any]:
    """Read what :func:`encode_state` wrote.

    Raises:
        ValueError: the JSON is not a dataset state of this format, or the tensors do not load.
    """
    try:
        data = json.loads(meta)
    except ValueError as exc:
        raise ValueError(f"dataset state is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"dataset state has format {found!r}; this version reads {STATE_FORMAT!r}")
    try:
        loaded = st_load(arrays) if arrays else {}
    except Exception as exc:  # safetensors raises its own SafetensorError for any bad input
        raise ValueError(f"dataset state arrays do not load: {exc}") from exc
    return {"meta": data, "arrays": loaded}
