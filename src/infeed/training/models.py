"""Small model factories (``module:function`` targets for ``infeed train`` and the registry)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mlp", "mlp_784"]


def mlp(
    in_features: int = 784, hidden: Sequence[int] = (256, 256), out_features: int = 10
) -> torch.nn.Module:
    """Return a ReLU multi-layer perceptron: Linear, ReLU, ..., Linear.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers.
        out_features: output width (classes).
    """
    layers: list[torch.nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, out_features))
    return torch.nn.Sequential(*layers)


def mlp_784() -> torch.nn.Module:
    """Return BENCHMARKS.md's ``mlp-784``: Linear 784-256-ReLU-256-ReLU-10."""
    return mlp(784, (256, 256), 10)
