"""Model factories the inference tests load from a registry (in this process or in worker processes).

``probe`` multiplies its input by a weight vector (so versions differ by their weights), raises on
an input holding ``POISON``, can sleep per call, and can append one JSON line per call to a log
file: the rows it was given, and how many of them were already past their deadline (when the
request carries a ``deadline`` input) — what the tests count to prove expired requests never reach
the model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from infeed.inference import ModelRegistry

__all__ = ["FACTORY", "POISON", "Probe", "probe", "publish_probe", "read_log"]

#: An input value the probe refuses (raises ValueError).
POISON = -999.0
#: The factory spec of ``probe``.
FACTORY = "tests.inference_models:probe"


class Probe(torch.nn.Module):
    """``x * weight``; see the module docstring."""

    def __init__(self, features: int, sleep_s: float, log: str | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(features))
        self.sleep_s = sleep_s
        self.log = log

    def forward(self, x: torch.Tensor, deadline: torch.Tensor | None = None) -> torch.Tensor:
        """Check, log, sleep, multiply."""
        now = time.time()
        if bool((x == POISON).any()):
            raise ValueError("poison input")
        if self.log is not None:
            late = int((deadline < now).sum()) if deadline is not None else 0
            line = json.dumps({"rows": int(x.shape[0]), "late": late, "pid": os.getpid()}) + "\n"
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(line)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return x * self.weight


def probe(features: int = 4, sleep_s: float = 0.0, log: str | None = None) -> Probe:
    """Build a probe whose weights are all ones."""
    return Probe(features, sleep_s, log)


def publish_probe(registry: ModelRegistry, name: str, version: int, scale: float, **kwargs: object) -> None:
    """Publish a probe whose weights are all ``scale`` as ``name`` version ``version``."""
    model = probe(**kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        model.weight.fill_(scale)
    registry.publish(name, model, version=version, factory=FACTORY, kwargs=dict(kwargs))


def read_log(path: Path) -> list[dict[str, int]]:
    """Return the probe's log lines."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
