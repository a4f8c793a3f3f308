"""scikit-learn's bundled digits, read straight from the file the package ships (nothing downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from infeed.errors import ConfigError

__all__ = ["load_digits"]


def load_digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Return the digits' features (float64) and labels (int64), as ``load_digits()`` gives them.

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ConfigError("the demo needs scikit-learn's bundled digits: pip install 'infeed[demo]'")
    # load_digits() parses this file (sklearn/datasets/_base.py); reading it ourselves skips the
    # seconds that importing sklearn (and scipy) takes.
    for root in spec.submodule_search_locations or ():
        path = Path(root, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return np.ascontiguousarray(data[:, :-1]), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    return np.ascontiguousarray(digits.data, dtype=np.float64), np.asarray(digits.target, dtype=np.int64)
