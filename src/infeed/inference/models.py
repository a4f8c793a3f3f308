"""Loaded model versions: the current one, pinned ones in a small LRU, and hot reload.

``LoadedModels`` keeps the version new requests use (``current``) and up to ``max_loaded``
versions in memory, least recently used evicted first (the current one never is). A request that
pins a version not in memory loads it from the registry.

``VersionFollower`` reads the model-events topic in a thread of its own, loads each announced
version of its model there, beside the one in use, and hands it over; the worker installs it
between batches (``LoadedModels.install_ready``), so no batch ever sees a half-swapped model.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections import OrderedDict

import torch

from infeed.brokers.base import Broker
from infeed.inference.registry import DEFAULT_EVENTS_TOPIC, ModelRegistry

__all__ = ["DEFAULT_MAX_LOADED", "LoadedModels", "VersionFollower"]

#: Versions of a model held in memory at once, at most.
DEFAULT_MAX_LOADED = 3

_log = logging.getLogger(__name__)


class LoadedModels:
    """Versions of one model in memory.

    Args:
        registry: where versions are loaded from.
        name: the model.
        max_loaded: versions kept in memory, at most (>= 1).

    Raises:
        LookupError: the registry has no version of ``name``.
    """

    def __init__(self, registry: ModelRegistry, name: str, *, max_loaded: int = DEFAULT_MAX_LOADED) -> None:
        if type(max_loaded) is not int or max_loaded < 1:
            raise ValueError(f"max_loaded must be an int >= 1, got {max_loaded!r}")
        self.registry = registry
        self.name = name
        self.max_loaded = max_loaded
        self._models: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self._ready: queue.SimpleQueue[tuple[int, torch.nn.Module]] = queue.SimpleQueue()
        latest = registry.latest(name)
        if latest is None:
            raise LookupError(f"model {name!r} has no versions in {registry.root}; publish one first")
        #: The version requests without a pin are computed with.
        self.current = latest.version
        self._put(latest.version, registry.load(name, latest.version))

    def get(self, version: int | None) -> tuple[int, torch.nn.Module]:
        """Return (version, model) for a pin, or the current version for None.

        Raises:
            LookupError: no such version in the registry.
        """
        v = self.current if version is None else version
        model = self._models.get(v)
        if model is None:
            model = self.registry.load(self.name, v)
            self._put(v, model)
        else:
            self._models.move_to_end(v)
        return v, model

    def offer(self, version: int, model: torch.nn.Module) -> None:
        """Hand over a version loaded in another thread; installed by ``install_ready``."""
        self._ready.put((version, model))

    def install_ready(self) -> list[int]:
        """Install versions handed over; a newer one becomes current. Call between batches."""
        installed: list[int] = []
        while True:
            try:
                version, model = self._ready.get_nowait()
            except queue.Empty:
                return installed
            self._put(version, model)
            if version > self.current:
                self.current = version
            installed.append(version)

    def loaded(self) -> list[int]:
        """Versions in memory, least recently used first."""
        return list(self._models)

    def _put(self, version: int, model: torch.nn.Module) -> None:
        self._models[version] = model
        self._models.move_to_end(version)
        while len(self._models) > self.max_loaded:
            # Least recently used first; the current version and the one just used stay, even
            # when that holds one more than max_loaded for a while.
            evictable = [v for v in self._models if v not in (self.current, version)]
            if not evictable:
                break
            del self._models[evictable[0]]


class VersionFollower:
    """Follows the model-events topic in a daemon thread and preloads announced versions.

    Each follower reads every announcement (its own consumer group, from the moment it starts).
    Announcements are at least once: a version already offered is skipped.

    Args:
        broker: where the events topic is.
        models: where loaded versions are offered.
        topic: the model-events topic.
    """

    def __init__(self, broker: Broker, models: LoadedModels, *, topic: str = DEFAULT_EVENTS_TOPIC) -> None:
        self.models = models
        self._consumer = broker.subscribe(
            topic, group=f"infeed.follow.{models.name}.{uuid.uuid4().hex}", start="latest"
        )
        self._stop = threading.Event()
        self._seen: set[int] = set(models.loaded())
        self._thread = threading.Thread(target=self._run, name=f"infeed-follow-{models.name}", daemon=True)
        #: The error that stopped the thread, if any.
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for delivery in self._consumer.receive(max_messages=10, timeout_s=0.5):
                    self._handle(delivery.payload)
                    self._consumer.ack(delivery)
        except BaseException as exc:  # reported through .error; the worker keeps serving its versions
            self.error = exc
            _log.exception("model-events follower of %s stopped", self.models.name)

    def _handle(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
            name, version = event["model"], event["version"]
        except (ValueError, TypeError, KeyError):
            _log.warning("ignoring a model event that is not {model, version, ...}: %r", payload[:200])
            return
        if name != self.models.name or type(version) is not int or version in self._seen:
            return
        try:
            model = self.models.registry.load(name, version)
        except Exception as exc:  # a bad version must not stop the follower: the old one serves on
            _log.error("cannot load announced version %s of %s: %r", version, name, exc)
            return
        self._seen.add(version)
        self.models.offer(version, model)

    def close(self) -> None:
        """Stop following and leave the group. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._consumer.close()
