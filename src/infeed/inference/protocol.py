"""The inference wire protocol: requests and replies as msgpack records, and their topics.

A request is the msgpack record::

    {"request_id": str, "reply_to": topic, "deadline": epoch seconds (float),
     "priority": int (0 = highest), "model": str, "model_version": int | None,
     "inputs": {name: ndarray}}

published on ``infeed.requests.<model>.p<priority>`` (a topic per priority level, so the depth of
each level is known and queue engines need no priority support). Every input has the same
leading dimension, the request's rows; a request of one sample has one row.

A reply is the msgpack record::

    {"request_id": str, "model": str, "model_version": int | None,
     "outputs": {name: ndarray}}          on success, or
     "error": {"code": ErrorCode, "message": str}}   on failure

published on the client's own ``reply_to`` topic. ``deadline`` is wall-clock time because it
crosses processes and machines; local intervals use ``time.monotonic``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infeed.brokers.base import check_topic_name
from infeed.codecs import MsgpackCodec
from infeed.errors import DecodeError

__all__ = [
    "MAX_ID_CHARS",
    "MAX_INPUTS",
    "MAX_PRIORITY_LEVELS",
    "REPLIES_PREFIX",
    "REQUESTS_PREFIX",
    "ErrorCode",
    "InvalidRequestError",
    "Reply",
    "ReplyError",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "reply_topic",
    "request_topic",
    "request_topics",
    "worker_group",
]

#: Requests of model M at priority P go to ``<REQUESTS_PREFIX>.M.pP``.
REQUESTS_PREFIX = "infeed.requests"
#: A client's replies go to ``<REPLIES_PREFIX>.<client id>`` unless it names its own topic.
REPLIES_PREFIX = "infeed.replies"
#: Priority levels are 0 (highest) to MAX_PRIORITY_LEVELS - 1.
MAX_PRIORITY_LEVELS = 10
#: Most named inputs (or outputs) one request (or reply) may carry.
MAX_INPUTS = 64
#: Longest request id, input name or error message part that identifies something.
MAX_ID_CHARS = 128
#: Longest error message a reply carries (longer ones are cut).
MAX_MESSAGE_CHARS = 2000

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CODEC = MsgpackCodec()


class ErrorCode(enum.StrEnum):
    """Why a request failed."""

    #: The deadline passed before the request was computed; it never reached the model.
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    #: The request is malformed or its inputs do not fit the model.
    INVALID_INPUT = "INVALID_INPUT"
    #: The model raised on this request (it was isolated from the rest of its batch).
    MODEL_ERROR = "MODEL_ERROR"
    #: The model or the pinned version is not in the registry.
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"


class InvalidRequestError(DecodeError):
    """A request record is malformed; carries what could be read, so it can still be answered.

    Attributes:
        request_id: the request's id, when it was readable.
        reply_to: where to answer, when it was readable and a valid topic name.
    """

    def __init__(self, message: str, *, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


def _check_model(model: object) -> str:
    if not isinstance(model, str) or not _MODEL.match(model):
        raise ValueError(f"model name {model!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 chars)")
    return model


def _check_priority(priority: object, levels: int = MAX_PRIORITY_LEVELS) -> int:
    if type(priority) is not int or not 0 <= priority < levels:
        raise ValueError(f"priority must be an int in [0, {levels - 1}] (0 = highest), got {priority!r}")
    return priority


def request_topic(model: str, priority: int = 0) -> str:
    """Return the topic of ``model``'s requests at ``priority``.

    Raises:
        ValueError: a bad model name or priority.
    """
    return f"{REQUESTS_PREFIX}.{_check_model(model)}.p{_check_priority(priority)}"


def request_topics(model: str, levels: int) -> list[str]:
    """Return ``model``'s request topics, highest priority first."""
    if type(levels) is not int or not 1 <= levels <= MAX_PRIORITY_LEVELS:
        raise ValueError(f"priority levels must be an int in [1, {MAX_PRIORITY_LEVELS}], got {levels!r}")
    return [request_topic(model, p) for p in range(levels)]


def reply_topic(client_id: str) -> str:
    """Return the reply topic of a client named ``client_id``."""
    topic = f"{REPLIES_PREFIX}.{client_id}"
    check_topic_name(topic)
    return topic


def worker_group(model: str) -> str:
    """Return the consumer group the workers of ``model`` share on its request topics."""
    return f"infeed.workers.{_check_model(model)}"


def _check_arrays(arrays: object, what: str) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(f"{what} must be a non-empty mapping of name to array, got {type(arrays).__name__}")
    if len(arrays) > MAX_INPUTS:
        raise ValueError(f"{what} has {len(arrays)} arrays; at most {MAX_INPUTS} are allowed")
    rows = None
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or len(name) > MAX_ID_CHARS:
            raise ValueError(
                f"{what} names must be non-empty str of at most {MAX_ID_CHARS} chars, got {name!r}"
            )
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{what}[{name!r}] must be a numpy array, got {type(value).__name__}")
        if value.ndim == 0 or value.shape[0] == 0:
            raise ValueError(f"{what}[{name!r}] needs a leading rows dimension >= 1, got shape {value.shape}")
        if rows is not None and value.shape[0] != rows:
            raise ValueError(f"{what}[{name!r}] has {value.shape[0]} rows; the other arrays have {rows}")
        rows = value.shape[0]
        out[name] = value
    return out


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


@dataclass(frozen=True, kw_only=True)
class Request:
    """One inference request (see the module docstring for the record).

    Attributes:
        request_id: unique id; replies are matched and de-duplicated by it.
        reply_to: the topic the reply goes to.
        deadline: wall-clock epoch seconds after which the request is not computed.
        model: the model's name.
        inputs: name -> array; every array has the same leading (rows) dimension.
        priority: 0 is the highest.
        model_version: compute with this version (default: the worker's current one).
    """

    request_id: str
    reply_to: str
    deadline: float
    model: str
    inputs: Mapping[str, np.ndarray]
    priority: int = 0
    model_version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not 0 < len(self.request_id) <= MAX_ID_CHARS:
            raise ValueError(f"request_id must be a non-empty str of at most {MAX_ID_CHARS} chars")
        check_topic_name(self.reply_to)
        if not isinstance(self.deadline, int | float) or not math.isfinite(self.deadline):
            raise ValueError(f"deadline must be finite epoch seconds, got {self.deadline!r}")
        _check_model(self.model)
        _check_priority(self.priority)
        if self.model_version is not None and (type(self.model_version) is not int or self.model_version < 0):
            raise ValueError(f"model_version must be an int >= 0 or None, got {self.model_version!r}")
        object.__setattr__(self, "inputs", _check_arrays(self.inputs, "inputs"))

    @property
    def rows(self) -> int:
        """The leading dimension shared by the inputs."""
        return _rows(self.inputs)

    def to_record(self) -> dict[str, Any]:
        """The msgpack record of this request."""
        return {
            "request_id": self.request_id,
            "reply_to": self.reply_to,
            "deadline": float(self.deadline),
            "priority": self.priority,
            "model": self.model,
            "model_version": self.model_version,
            "inputs": dict(self.inputs),
        }


@dataclass(frozen=True, kw_only=True)
class ReplyError:
    """The error of a failed request.

    Attributes:
        code: why it failed.
        message: what happened, for people.
    """

    code: ErrorCode
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Reply:
    """The answer to one request: outputs, or an error.

    Attributes:
        request_id: the request it answers.
        model: the model's name.
        model_version: the version that computed it (None when no version was reached).
        outputs: name -> array with the request's rows, on success.
        error: why it failed, on failure.
    """

    request_id: str
    model: str
    model_version: int | None = None
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    error: ReplyError | None = None

    def __post_init__(self) -> None:
        if (self.error is None) == (not self.outputs):
            raise ValueError("a reply has outputs or an error, exactly one of them")
        if self.error is None:
            object.__setattr__(self, "outputs", _check_arrays(self.outputs, "outputs"))

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None

    def to_record(self) -> dict[str, Any]:
        """The msgpack record of this reply."""
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "model_version": self.model_version,
        }
        if self.error is None:
            record["outputs"] = dict(self.outputs)
        else:
            record["error"] = {
                "code": str(self.error.code),
                "message": self.error.message[:MAX_MESSAGE_CHARS],
            }
        return record


def encode_request(request: Request) -> bytes:
    """Encode a request (msgpack, arrays as raw little-endian bytes)."""
    return _CODEC.encode(request.to_record())


def encode_reply(reply: Reply) -> bytes:
    """Encode a reply."""
    return _CODEC.encode(reply.to_record())


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS * 2 else None


def decode_request(payload: bytes) -> Request:
    """Decode and validate a request; arrays are read-only views of ``payload``.

    Raises:
        InvalidRequestError: not a request; ``request_id`` / ``reply_to`` are set when readable.
    """
    try:
        record = _CODEC.decode(payload)
    except DecodeError as exc:
        raise InvalidRequestError(f"undecodable request: {exc}") from exc
    request_id, reply_to = _str_or_none(record.get("request_id")), _str_or_none(record.get("reply_to"))
    try:
        check_topic_name(reply_to or "")
    except ValueError:
        reply_to = None
    unknown = set(record) - {
        "request_id",
        "reply_to",
        "deadline",
        "priority",
        "model",
        "model_version",
        "inputs",
    }
    try:
        if unknown:
            raise ValueError(f"unknown request fields {sorted(unknown)}")
        missing = {"request_id", "reply_to", "deadline", "model", "inputs"} - set(record)
        if missing:
            raise ValueError(f"request lacks {sorted(missing)}")
        return Request(
            request_id=record["request_id"],
            reply_to=record["reply_to"],
            deadline=record["deadline"],
            priority=record.get("priority", 0),
            model=record["model"],
            model_version=record.get("model_version"),
            inputs=record["inputs"],
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"invalid request: {exc}", request_id=request_id, reply_to=reply_to
        ) from exc


def decode_reply(payload: bytes) -> Reply:
    """Decode and validate a reply.

    Raises:
        DecodeError: not a valid reply.
    """
    record = _CODEC.decode(payload)
    try:
        error = record.get("error")
        return Reply(
            request_id=str(record["request_id"]),
            model=str(record["model"]),
            model_version=record.get("model_version"),
            outputs=record.get("outputs") or {},
            error=None
            if error is None
            else ReplyError(code=ErrorCode(error["code"]), message=str(error["message"])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"invalid reply: {exc!r}") from exc
