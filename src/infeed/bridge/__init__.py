"""Bridges: forward messages from other messaging systems into infeed topics.

``MqttBridge`` (``infeed bridge mqtt://...``) needs paho-mqtt: ``pip install 'infeed[mqtt]'``.
It is imported on first use, so ``import infeed.bridge`` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infeed.bridge.mqtt import BridgeStats, MqttBridge, MqttBridgeConfig

__all__ = ["BridgeStats", "MqttBridge", "MqttBridgeConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from infeed.bridge import mqtt

        return getattr(mqtt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
