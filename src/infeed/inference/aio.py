"""``AsyncClient``: the ``Client`` for asyncio code, as a thin adapter (no second implementation).

Sending runs in a thread (``asyncio.to_thread``: the broker contract is synchronous) and the
client's ``concurrent.futures.Future`` is awaited with ``asyncio.wrap_future``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

import numpy as np

from infeed.brokers.base import Broker
from infeed.inference.client import Client, ClientConfig, Inputs
from infeed.inference.protocol import Reply

__all__ = ["AsyncClient"]


class AsyncClient:
    """``Client`` with awaitable methods; same arguments, same semantics.

    Args:
        broker: where requests go and replies come (not owned).
        model: the model's name.
        config: client settings.
    """

    def __init__(self, broker: Broker, model: str, *, config: ClientConfig | None = None) -> None:
        #: The synchronous client doing the work.
        self.client = Client(broker, model, config=config)

    async def submit(
        self,
        inputs: Inputs,
        *,
        timeout_s: float | None = None,
        priority: int = 0,
        model_version: int | None = None,
    ) -> asyncio.Future[Reply]:
        """Send one request; return an awaitable of its ``Reply`` (see ``Client.submit``)."""
        future = await asyncio.to_thread(
            self.client.submit, inputs, timeout_s=timeout_s, priority=priority, model_version=model_version
        )
        return asyncio.wrap_future(future)

    async def predict(
        self,
        inputs: Inputs,
        *,
        timeout_s: float | None = None,
        priority: int = 0,
        model_version: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Send one request and await its outputs (see ``Client.predict``)."""
        reply = await (
            await self.submit(inputs, timeout_s=timeout_s, priority=priority, model_version=model_version)
        )
        return dict(reply.outputs)

    async def close(self) -> None:
        """Close the client (see ``Client.close``)."""
        await asyncio.to_thread(self.client.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
