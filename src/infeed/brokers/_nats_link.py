"""The nats:// backend's connection: names, headers, retries, JetStream API, pipelined publish.

Everything here runs on the backend's event loop (see ``_aio.LoopThread``); nats.py calls it from
the synchronous side. Names:

* topic ``T`` -> stream ``infeed_<esc(T)>`` with one subject per partition,
  ``infeed.<esc(T)>.<partition>``;
* group ``G``, partition ``p`` -> durable pull consumer ``<esc(G)>_P<p>`` filtered on that subject;
* committed offsets -> key ``<esc(T)>.<esc(G)>.<p>`` of the KV bucket ``infeed-offsets``.

``esc`` keeps ``[A-Za-z0-9-]`` and writes every other UTF-8 byte as ``_XX`` (hex), so it is
reversible and yields one valid subject token, stream name and consumer name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg

from infeed.brokers._retry import backoff_s
from infeed.errors import BrokerConnectionError, BrokerTimeoutError

if TYPE_CHECKING:
    from infeed.brokers.nats import NATSConfig

T = TypeVar("T")
_log = logging.getLogger("infeed.brokers.nats")

STREAM_PREFIX = "infeed_"
SUBJECT_PREFIX = "infeed."
OFFSETS_BUCKET = "infeed-offsets"
OFFSETS_STREAM = f"KV_{OFFSETS_BUCKET}"
KEY_HEADER = "Infeed-Key"
HEADERS_HEADER = "Infeed-Headers"
_RESERVED = ("nats-", "infeed-")
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

#: JetStream error codes the backend acts on.
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE = 10037

#: Errors after which an operation is tried again (the connection or JetStream is recovering).
RETRIABLE: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


# -- names ---------------------------------------------------------------------------------


def esc(name: str) -> str:
    """Escape ``name`` into ``[A-Za-z0-9_-]`` reversibly (``_XX`` per other UTF-8 byte)."""
    return "".join(chr(b) if b in _PLAIN else f"_{b:02X}" for b in name.encode())


def unesc(text: str) -> str:
    """Invert :func:`esc`."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "_":
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    return out.decode()


def stream_of(topic: str) -> str:
    """The stream that holds ``topic``."""
    return STREAM_PREFIX + esc(topic)


def topic_of(stream: str) -> str | None:
    """The topic a stream holds, or None for a stream infeed did not make."""
    if not stream.startswith(STREAM_PREFIX):
        return None
    try:
        return unesc(stream[len(STREAM_PREFIX) :])
    except (ValueError, UnicodeDecodeError):
        return None


def subject_of(topic: str, partition: int) -> str:
    """The subject of one partition of ``topic``."""
    return f"{SUBJECT_PREFIX}{esc(topic)}.{partition}"


def durable_of(group: str, partition: int) -> str:
    """The durable consumer of ``group`` on one partition."""
    return f"{esc(group)}_P{partition}"


def group_of(durable: str) -> tuple[str, int] | None:
    """Invert :func:`durable_of` (None for a consumer infeed did not make)."""
    head, sep, tail = durable.rpartition("_P")
    if not sep or not tail.isdigit():
        return None
    try:
        return unesc(head), int(tail)
    except (ValueError, UnicodeDecodeError):
        return None


def offsets_key(topic: str, group: str, partition: int) -> str:
    """The KV subject holding a group's committed offset of one partition."""
    return f"$KV.{OFFSETS_BUCKET}.{esc(topic)}.{esc(group)}.{partition}"


def redact(server: str) -> str:
    """The server URL without its password, for messages."""
    parts = urlsplit(server)
    if parts.password is None:
        return server
    netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "", "", ""))


# -- headers -------------------------------------------------------------------------------


def _native(key: str, value: str) -> bool:
    """Whether a header survives NATS headers unchanged (nats-py strips values, drops CR/LF)."""
    return (
        bool(key)
        and all(c in _TOKEN for c in key)
        and not key.lower().startswith(_RESERVED)
        and value.isprintable()
        and value == value.strip()
    )


def encode_headers(key: bytes | None, headers: Mapping[str, str]) -> dict[str, str] | None:
    """NATS headers for a message: plain headers as they are, the rest as JSON, the key in base64."""
    if key is None and not headers:
        return None
    out: dict[str, str] = {}
    odd: dict[str, str] = {}
    for k, v in headers.items():
        if _native(k, v):
            out[k] = v
        else:
            odd[k] = v
    if odd:
        out[HEADERS_HEADER] = json.dumps(odd)
    if key is not None:
        out[KEY_HEADER] = base64.b64encode(key).decode()
    return out


def decode_headers(raw: Mapping[str, str] | None) -> tuple[bytes | None, dict[str, str]]:
    """Invert :func:`encode_headers`: ``(key, headers)``; headers of other producers pass through."""
    if not raw:
        return None, {}
    key: bytes | None = None
    out: dict[str, str] = {}
    for k, v in raw.items():
        if k == KEY_HEADER:
            try:
                key = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                key = v.encode()
        elif k == HEADERS_HEADER:
            try:
                extra = json.loads(v)
            except ValueError:
                out[k] = v
                continue
            if isinstance(extra, dict):
                out.update({str(a): str(b) for a, b in extra.items()})
        elif not k.lower().startswith("nats-"):
            out[k] = v
    return key, out


def headers_size(headers: Mapping[str, str] | None) -> int:
    """Bytes the header block adds to a message (it counts against the server's max_payload)."""
    if headers is None:
        return 0
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


# -- connection ----------------------------------------------------------------------------


class _PubBatch:
    """Acks awaited for one pipelined publish."""

    __slots__ = ("acked", "broken", "error", "event", "low_water", "outstanding")

    def __init__(self, n: int) -> None:
        self.acked = [False] * n
        self.outstanding = 0
        self.low_water = 0
        #: the first refusal the server answered (no stream, API error)
        self.error: BaseException | None = None
        #: the connection failed under the batch
        self.broken: BaseException | None = None
        self.event = asyncio.Event()

    def done_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding <= self.low_water:
            self.event.set()


class Link:
    """One nats-py connection with bounded, backed-off retries and a publish pipeline.

    Make it and use it on one event loop (the broker's ``LoopThread``).
    """

    def __init__(self, config: NATSConfig) -> None:
        self.cfg = config
        #: the loop this connection lives on (a Link is made on it)
        self.loop = asyncio.get_running_loop()
        #: the server URL without its password, for messages
        self.url = redact(config.server)
        self.nc: Client = Client()
        self.connected = asyncio.Event()
        #: bumped on every reconnect: pull requests of an older epoch are gone
        self.epoch = 0
        self._tokens = itertools.count(1)
        self._pending: dict[str, tuple[_PubBatch, int]] = {}
        self._reply_prefix = ""
        #: called on every disconnect and reconnect (pullers wake their waits)
        self.listeners: set[Callable[[], None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        cfg = self.cfg
        await self.nc.connect(
            servers=[cfg.server],
            name="infeed",
            connect_timeout=max(1, round(cfg.request_timeout_s)),
            # The first connect tries reconnect_attempts + 1 times, reconnect_backoff_s apart;
            # afterwards the connection is retried for ever, backing off exponentially
            # (_next_server), while each operation gives up after its own bounded retries.
            max_reconnect_attempts=max(1, cfg.reconnect_attempts),
            reconnect_time_wait=cfg.reconnect_backoff_s,  # type: ignore[arg-type]
            reconnect_to_server_handler=self._next_server,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            # Nothing is buffered while disconnected: a publish then fails at once and is sent
            # again after the reconnect by ``retrying`` (a buffer would send it twice).
            pending_size=0,
            # Every subject is built here from escaped names: skip nats-py's per-publish regex.
            skip_subject_validation=True,
        )
        self.nc.options["max_reconnect_attempts"] = -1
        self.connected.set()
        self._reply_prefix = self.nc.new_inbox() + "."
        await self.nc.subscribe(self._reply_prefix + "*", cb=self._on_pub_ack)

    async def close(self) -> None:
        self.connected.clear()
        self._fail_pending(nats.errors.ConnectionClosedError())
        if not self.nc.is_closed:
            await self.nc.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background (held until done; cancelled when the loop closes)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        tries = min((s.reconnects for s in servers), default=0)
        return (servers[0] if servers else None), self.backoff(tries)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        return backoff_s(attempt, self.cfg.reconnect_backoff_s, self.cfg.reconnect_backoff_max_s)

    async def _on_error(self, exc: Exception) -> None:
        _log.debug("nats connection to %s: %r", self.url, exc)

    async def _on_disconnect(self) -> None:
        if self.connected.is_set():
            _log.warning("lost the connection to NATS at %s; reconnecting", self.url)
        self.connected.clear()
        self._fail_pending(nats.errors.ConnectionReconnectingError())
        for wake in list(self.listeners):
            wake()

    async def _on_reconnect(self) -> None:
        _log.warning("reconnected to NATS at %s", self.url)
        self.epoch += 1
        self.connected.set()
        for wake in list(self.listeners):
            wake()

    # -- retries -----------------------------------------------------------------------------

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``; on a connection-type failure wait (backing off) and run it again.

        Raises:
            BrokerConnectionError: naming the URL, after ``reconnect_attempts`` retries.
        """
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                if self.nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                if not self.connected.is_set():
                    raise nats.errors.ConnectionReconnectingError
                return await op()
            except RETRIABLE as exc:
                if attempt >= self.cfg.reconnect_attempts:
                    raise BrokerConnectionError(
                        f"NATS at {self.url}: {what} failed {attempt + 1} times over "
                        f"{time.monotonic() - started:.1f} s ({type(exc).__name__}: {exc}); is the "
                        "server running, with JetStream? (reconnect_attempts, reconnect_backoff_s)"
                    ) from exc
                _log.debug("%s failed (%r); retry %d", what, exc, attempt + 1)
                await self._pause(self.backoff(attempt))
                attempt += 1

    async def _pause(self, seconds: float) -> None:
        """Back off for ``seconds``; while disconnected, stop early once the connection is back."""
        if self.connected.is_set():
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), seconds)

    # -- JetStream API -----------------------------------------------------------------------

    async def api(self, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request (``$JS.API.`` + ``subject``), retried on connection loss.

        Raises:
            nats.js.errors.APIError: what the server answered (NotFoundError, BadRequestError...).
        """
        payload = json.dumps(body).encode() if body is not None else b""

        async def once() -> dict[str, Any]:
            msg = await self.nc.request("$JS.API." + subject, payload, timeout=self.cfg.request_timeout_s)
            resp: dict[str, Any] = json.loads(msg.data)
            if "error" in resp:
                nats.js.errors.APIError.from_error(resp["error"])
            return resp

        return await self.retrying(" ".join(subject.split(".")[:2]).lower(), once)

    async def send(self, subjects: list[str], body: bytes, *, confirm: Collection[str] = ()) -> None:
        """Publish ``body`` (``+ACK``, ``-NAK``...) to every ack subject; retried.

        The subjects in ``confirm`` go last, as requests, and the call waits until the server
        answered each: it answers a settle that carries a reply subject once it processed it, and
        it processes one consumer's settles in order, so those sent before on the same consumer
        are done too. (``flush`` would not do: nats-py writes its PING ahead of the publishes
        still in its buffer.)
        """
        plain = [s for s in subjects if s not in confirm] if confirm else subjects
        asked = [s for s in subjects if s in confirm] if confirm else []

        async def once() -> None:
            for s in plain:
                await self.nc.publish(s, body)
            if asked:
                timeout = self.cfg.request_timeout_s
                await asyncio.gather(*(self.nc.request(s, body, timeout=timeout) for s in asked))

        await self.retrying("ack", once)

    # -- pipelined publish -------------------------------------------------------------------

    async def publish(
        self,
        items: list[tuple[str, bytes, dict[str, str] | None]],
        on_missing: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """Publish ``items`` (subject, payload, headers) with JetStream acks, pipelined.

        Returns once every item is acked. Items not acked when the connection drops are sent
        again after it comes back (at least once). ``on_missing(subjects)`` is awaited when no
        stream listens on a subject (then the rest is sent again).
        """
        batch = _PubBatch(len(items))

        async def once() -> None:
            error = await self._publish_once(items, batch)
            if isinstance(error, nats.errors.NoRespondersError) and on_missing is not None:
                missing = [items[i][0] for i, ok in enumerate(batch.acked) if not ok]
                await on_missing(sorted(set(missing)))
                error = await self._publish_once(items, batch)
            if error is not None:
                raise error

        await self.retrying("publish", once)

    async def _publish_once(
        self, items: list[tuple[str, bytes, dict[str, str] | None]], batch: _PubBatch
    ) -> BaseException | None:
        """Send the items not acked yet and wait for their acks; return the first refusal."""
        batch.error = batch.broken = None
        window = self.cfg.publish_window
        tokens: list[str] = []
        nc, prefix, pending = self.nc, self._reply_prefix, self._pending
        try:
            for i, (subject, payload, headers) in enumerate(items):
                if batch.acked[i]:
                    continue
                token = str(next(self._tokens))
                tokens.append(token)
                pending[token] = (batch, i)
                batch.outstanding += 1
                await nc.publish(subject, payload, reply=prefix + token, headers=headers)
                if batch.outstanding >= window:
                    await self._wait_batch(batch, window // 2)
            await self._wait_batch(batch, 0)
        finally:
            for token in tokens:
                pending.pop(token, None)
            batch.outstanding = 0
        return batch.error

    async def _wait_batch(self, batch: _PubBatch, low_water: int) -> None:
        """Wait until at most ``low_water`` acks are missing.

        While the connection stays up nothing is sent again: the server answers every publish
        it read, however slowly (a loaded server stalls for seconds). Only a lost connection
        (``batch.broken``) makes ``publish`` send the unacked rest again.
        """
        batch.low_water = low_water
        strikes, seen = 0, batch.outstanding
        while batch.outstanding > low_water and batch.broken is None:
            batch.event.clear()
            try:
                await asyncio.wait_for(batch.event.wait(), self.cfg.request_timeout_s)
            except TimeoutError:
                strikes = 0 if batch.outstanding < seen else strikes + 1
                seen = batch.outstanding
                if strikes > self.cfg.reconnect_attempts:
                    raise BrokerTimeoutError(
                        f"NATS at {self.url} acked none of {batch.outstanding} publishes for "
                        f"{strikes * self.cfg.request_timeout_s:.0f} s (request_timeout_s); they may "
                        "or may not be stored"
                    ) from None
        if batch.broken is not None:
            raise batch.broken

    async def _on_pub_ack(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._reply_prefix) :], None)
        if entry is None:
            return
        batch, i = entry
        data = msg.data
        if not data and msg.headers and msg.headers.get("Status") == "503":
            batch.error = batch.error or nats.errors.NoRespondersError()
        elif b'"error"' in data:
            try:
                nats.js.errors.APIError.from_error(json.loads(data)["error"])
            except nats.js.errors.APIError as exc:
                batch.error = batch.error or exc
        else:
            batch.acked[i] = True
        batch.done_one()

    def _fail_pending(self, exc: BaseException) -> None:
        for batch, _ in list(self._pending.values()):
            batch.broken = exc
            batch.event.set()
        self._pending.clear()
