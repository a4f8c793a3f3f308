"""The one error tree of infeed.

Every backend translates its client library's exceptions into this tree at one boundary
(``_map_errors`` in each backend module) and raises ``from`` the original so the cause survives.
No error is ever turned into "no message".

::

    InfeedError
    ├── ConfigError                 bad URL, unknown option, missing extra
    ├── BrokerError
    │   ├── BrokerConnectionError   cannot reach the broker (after retries)
    │   ├── BrokerTimeoutError      the broker did not answer in time
    │   ├── TopicNotFoundError
    │   ├── PayloadTooLargeError    nothing was written
    │   ├── LeaseLostError          an ack/nack for a delivery whose lease passed to another member
    │   ├── UnsupportedOperationError  the backend does not declare that capability
    │   └── ConsumerClosedError
    ├── CodecError
    │   ├── EncodeError
    │   └── DecodeError
    │       └── SchemaError         decoded fine, but does not match the Schema
    ├── QueueFull                   backpressure: the queue is above its configured depth
    └── InferenceError              an inference request was answered with an error
        └── DeadlineExceededError   ... because its deadline passed (also a TimeoutError)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BrokerConnectionError",
    "BrokerError",
    "BrokerTimeoutError",
    "CodecError",
    "ConfigError",
    "ConsumerClosedError",
    "DeadlineExceededError",
    "DecodeError",
    "EncodeError",
    "InferenceError",
    "InfeedError",
    "LeaseLostError",
    "PayloadTooLargeError",
    "QueueFull",
    "SchemaError",
    "TopicNotFoundError",
    "UnsupportedOperationError",
]


class InfeedError(Exception):
    """Base of every error infeed raises on purpose."""


class ConfigError(InfeedError, ValueError):
    """A setting, URL or option is wrong, or an optional dependency is missing."""


class BrokerError(InfeedError):
    """The broker refused or failed an operation."""


class BrokerConnectionError(BrokerError):
    """The broker cannot be reached (after the configured retries)."""


class BrokerTimeoutError(BrokerError):
    """The broker did not answer within the deadline."""


class TopicNotFoundError(BrokerError):
    """The topic does not exist and the operation does not create topics."""


class PayloadTooLargeError(BrokerError):
    """A payload is over the backend's size limit; nothing of the call was written."""


class LeaseLostError(BrokerError):
    """An ack or nack came after the delivery's lease had passed to another consumer.

    The message may be (or may have been) delivered to another member of the group; the
    caller's work on it must be treated as not counted. The other deliveries of the same call
    were settled; ``positions`` names the ones that were not.
    """

    def __init__(self, message: str, *, positions: Sequence[object] = ()) -> None:
        super().__init__(message)
        #: Positions (``infeed.types.Position``) of the deliveries whose lease was lost.
        self.positions: tuple[object, ...] = tuple(positions)


class UnsupportedOperationError(BrokerError):
    """The backend does not have the capability an operation needs."""


class ConsumerClosedError(BrokerError):
    """The consumer was used after ``close()``."""


class CodecError(InfeedError):
    """A record could not be encoded or decoded."""


class EncodeError(CodecError, ValueError):
    """A record cannot be encoded (unsupported type, dtype outside the allowlist, ...)."""


class DecodeError(CodecError, ValueError):
    """Bytes are not a valid message for the codec (truncated, corrupt, lying about lengths)."""


class SchemaError(DecodeError):
    """A record does not match its Schema (missing field, wrong dtype or shape, NaN)."""


class QueueFull(InfeedError):
    """The queue is above its configured depth; retry later."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        #: A hint for how long to wait before retrying.
        self.retry_after_s = retry_after_s


class InferenceError(InfeedError):
    """An inference request was answered with an error (or had no answer in time).

    Attributes:
        code: the reply's error code (``DEADLINE_EXCEEDED``, ``INVALID_INPUT``, ``MODEL_ERROR``, ...).
        request_id: the request's id.
        model_version: the version that failed it, when one was reached.
    """

    def __init__(
        self, message: str, *, code: str, request_id: str = "", model_version: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.model_version = model_version


class DeadlineExceededError(InferenceError, TimeoutError):
    """The request's deadline passed before it was computed, or before its reply came."""
