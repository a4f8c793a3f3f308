"""An optimizer's ``state_dict`` as safetensors (its tensors) plus JSON (everything else), and back."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["optimizer_from_files", "optimizer_to_files"]

_Scalar = (bool, int, float, str, type(None))


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, _Scalar):
        return value
    if isinstance(value, tuple | list):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    raise TypeError(
        f"optimizer state {key!r} is a {type(value).__name__}; only tensors, numbers, str, bool, "
        "None and tuples/lists of them can be saved without pickle"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "float" in value:
            return float(value["float"])
        if "tuple" in value:
            return tuple(_decode(v, tensors) for v in value["tuple"])
        if "list" in value:
            return [_decode(v, tensors) for v in value["list"]]
        raise ValueError(f"unknown entry in saved optimizer state: {value!r}")
    return value


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[bytes, bytes]:
    """Return (safetensors bytes, JSON bytes) holding ``optimizer.state_dict()``.

    Raises:
        TypeError: the state holds a value neither format can carry.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state = {
        str(pid): {name: _encode(v, f"state.{pid}.{name}", tensors) for name, v in entry.items()}
        for pid, entry in sd["state"].items()
    }
    groups = [
        {name: _encode(v, f"group.{i}.{name}", tensors) for name, v in group.items()}
        for i, group in enumerate(sd["param_groups"])
    ]
    meta = json.dumps({"state": state, "param_groups": groups}, sort_keys=True, allow_nan=False)
    return st_save(tensors), meta.encode()


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors_bytes: bytes, meta_bytes: bytes) -> None:
    """Load what :func:`optimizer_to_files` wrote into ``optimizer``.

    Raises:
        ValueError: the files do not hold an optimizer state.
    """
    tensors = st_load(tensors_bytes)
    meta = json.loads(meta_bytes)
    if not isinstance(meta, dict) or set(meta) != {"state", "param_groups"}:
        raise ValueError("saved optimizer state has no 'state' and 'param_groups'")
    state = {int(pid): {k: _decode(v, tensors) for k, v in e.items()} for pid, e in meta["state"].items()}
    groups = [{k: _decode(v, tensors) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
