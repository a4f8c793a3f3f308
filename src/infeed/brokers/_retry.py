"""Bounded exponential backoff: the waits of the backends that retry an operation themselves.

Retry ``n`` (counting from 0) waits ``first_s * 2**n``, but never more than ``max_s``. The Redis
and NATS backends wait so between the attempts of one operation; Kafka and NATS add the waits up
into the time an operation may spend unreachable before it fails.
"""

from __future__ import annotations

__all__ = ["backoff_s", "backoff_total_s"]


def backoff_s(attempt: int, first_s: float, max_s: float) -> float:
    """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
    return float(min(first_s * 2**attempt, max_s))


def backoff_total_s(attempts: int, first_s: float, max_s: float) -> float:
    """Seconds of all the waits of ``attempts`` retries together."""
    return float(sum(backoff_s(i, first_s, max_s) for i in range(attempts)))
