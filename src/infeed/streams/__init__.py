"""Streams: records over a broker — encode, batch and publish; receive, decode, validate, dead-letter."""

from __future__ import annotations

from infeed.streams.consumer import Received, StreamConsumer
from infeed.streams.producer import DEFAULT_MESSAGES_PER_PUBLISH, Producer

__all__ = ["DEFAULT_MESSAGES_PER_PUBLISH", "Producer", "Received", "StreamConsumer"]
