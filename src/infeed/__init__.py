"""infeed: message queues put to work for AI.

Producers stream training samples and inference requests into a queue; training workers learn
from the stream, inference workers answer in dynamic batches, and model versions flow back over
the same bus. Start with :func:`infeed.connect`.
"""

from __future__ import annotations

from infeed.brokers import Broker, Consumer, Message, connect
from infeed.config import DEFAULT_BROKER_URL, Settings
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    CodecError,
    ConfigError,
    DecodeError,
    InfeedError,
    LeaseLostError,
    PayloadTooLargeError,
    QueueFull,
    SchemaError,
)
from infeed.types import Capability, Delivery, Position, TopicInfo

__all__ = [
    "DEFAULT_BROKER_URL",
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "Capability",
    "CodecError",
    "ConfigError",
    "Consumer",
    "DecodeError",
    "Delivery",
    "InfeedError",
    "LeaseLostError",
    "Message",
    "PayloadTooLargeError",
    "Position",
    "QueueFull",
    "SchemaError",
    "Settings",
    "TopicInfo",
    "connect",
]

__version__ = "0.1.0"
