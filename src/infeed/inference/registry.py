"""The model registry: versions as ``safetensors`` weights + a JSON config, announced on a topic.

Layout of ``ModelRegistry(root)``::

    root/<model>/<version>/model.safetensors   the weights (safetensors only, never pickle)
    root/<model>/<version>/config.json         factory "module:function", kwargs, step, samples, metrics

A version is written into a temporary folder, fsynced and renamed into place, so a reader sees it
whole or not at all. Publishing a version that exists is a no-op, so a trainer that crashed
between writing a version and announcing it can publish again. Announcements are JSON records
``{"model", "version", "path", "step", "samples"}`` on the model-events topic (default
``infeed.model-events``); they are at least once, so followers key on (model, version).

Loading imports the factory the config names: load only from registries you trust, or pass
``factory=`` to choose it yourself.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from infeed._files import fsync_dir, write_durable
from infeed.brokers import Broker
from infeed.codecs import JsonCodec
from infeed.streams import Producer

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_EVENTS_TOPIC",
    "WEIGHTS_FILE",
    "ModelRegistry",
    "ModelVersion",
    "announce",
    "resolve_factory",
]

#: Topic where trainers announce new model versions.
DEFAULT_EVENTS_TOPIC = "infeed.model-events"
#: Weights of a version.
WEIGHTS_FILE = "model.safetensors"
#: Everything else about a version.
CONFIG_FILE = "config.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"model name {name!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 chars)")
    return name


def resolve_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """Import ``module:function`` and return the function.

    Raises:
        ValueError: ``spec`` is not of that form, or names nothing callable.
        ImportError: the module does not import.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a model factory is 'module:function', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"model factory {spec!r} names nothing callable")
    factory: Callable[..., torch.nn.Module] = target
    return factory


@dataclass(frozen=True)
class ModelVersion:
    """One published version.

    Attributes:
        name: the model's name.
        version: its number (the trainer uses the step).
        path: the version's folder.
        factory: ``module:function`` that builds the untrained model.
        kwargs: keyword arguments of the factory.
        step: training steps behind it.
        samples: records trained behind it.
        metrics: whatever the trainer reported (loss, ...).
        created_at: publish time, seconds since the epoch.
    """

    name: str
    version: int
    path: Path
    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    step: int = 0
    samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def weights(self) -> Path:
        """The weights file."""
        return self.path / WEIGHTS_FILE

    def event(self) -> dict[str, Any]:
        """The announcement record of this version."""
        return {
            "model": self.name,
            "version": self.version,
            "path": str(self.path),
            "step": self.step,
            "samples": self.samples,
        }


class ModelRegistry:
    """Model versions in a folder; see the module docstring for the layout.

    Args:
        root: the registry folder (created on first publish).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def publish(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        version: int,
        factory: str,
        kwargs: Mapping[str, Any] | None = None,
        step: int = 0,
        samples: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> ModelVersion:
        """Write ``model``'s weights and config as ``name`` version ``version`` (no-op if it exists).

        Raises:
            ValueError: a bad name, version or factory spec, or kwargs JSON cannot carry.
        """
        _check_name(name)
        if type(version) is not int or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if ":" not in factory:
            raise ValueError(f"factory must be 'module:function', got {factory!r}")
        final = self.root / name / str(version)
        if (final / CONFIG_FILE).is_file():
            return self.get(name, version)
        config = {
            "format": "infeed.model/1",
            "model": name,
            "version": version,
            "factory": factory,
            "kwargs": dict(kwargs or {}),
            "step": step,
            "samples": samples,
            "metrics": dict(metrics or {}),
            "created_at": time.time(),  # wall clock: read by other machines
        }
        try:
            text = json.dumps(config, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model kwargs and metrics must be JSON-safe: {exc}") from exc
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{version}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS_FILE))
        with open(tmp / WEIGHTS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        write_durable(tmp / CONFIG_FILE, text.encode())
        fsync_dir(tmp)
        if final.exists():  # a folder without config: a copy left half-made by hand
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(parent)
        return self.get(name, version)

    def versions(self, name: str) -> list[int]:
        """Return ``name``'s complete versions, oldest first."""
        folder = self.root / _check_name(name)
        if not folder.is_dir():
            return []
        return sorted(
            int(e.name) for e in folder.iterdir() if e.name.isdigit() and (e / CONFIG_FILE).is_file()
        )

    def get(self, name: str, version: int) -> ModelVersion:
        """Return version ``version`` of ``name``.

        Raises:
            LookupError: there is no such version.
            ValueError: its config is unreadable.
        """
        path = self.root / _check_name(name) / str(version)
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LookupError(f"model {name!r} has no version {version} in {self.root}") from None
        except ValueError as exc:
            raise ValueError(f"{path / CONFIG_FILE} is not JSON: {exc}") from exc
        return ModelVersion(
            name=name,
            version=int(config["version"]),
            path=path,
            factory=str(config["factory"]),
            kwargs=dict(config.get("kwargs", {})),
            step=int(config.get("step", 0)),
            samples=int(config.get("samples", 0)),
            metrics=dict(config.get("metrics", {})),
            created_at=float(config.get("created_at", 0.0)),
        )

    def latest(self, name: str) -> ModelVersion | None:
        """Return the highest version of ``name``, or None if there is none."""
        found = self.versions(name)
        return self.get(name, found[-1]) if found else None

    def load(
        self,
        name: str,
        version: int | None = None,
        *,
        factory: Callable[..., torch.nn.Module] | None = None,
    ) -> torch.nn.Module:
        """Build the model and load a version's weights (safetensors only); returned in eval mode.

        Args:
            name: the model.
            version: the version (default the latest).
            factory: builds the model (default: import the one the config names, with its kwargs).

        Raises:
            LookupError: no such model or version.
        """
        found = self.latest(name) if version is None else self.get(name, version)
        if found is None:
            raise LookupError(f"model {name!r} has no versions in {self.root}")
        build = factory if factory is not None else resolve_factory(found.factory)
        model = build(**found.kwargs)
        load_model(model, str(found.weights))
        model.eval()
        return model


def announce(broker: Broker, version: ModelVersion, *, topic: str = DEFAULT_EVENTS_TOPIC) -> None:
    """Publish ``version``'s announcement (a JSON record) on ``topic``."""
    with Producer(broker, topic, codec=JsonCodec()) as producer:
        producer.send(version.event())
