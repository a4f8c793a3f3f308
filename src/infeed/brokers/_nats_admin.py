"""Topics, groups and committed offsets of the nats:// backend (JetStream API; runs on the loop).

See nats.py for how topics, partitions, groups and offsets map onto streams, subjects, consumers
and the ``infeed-offsets`` KV bucket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import TYPE_CHECKING, Any

import nats.js.errors

from infeed.brokers._nats_link import (
    ERR_NO_MESSAGE,
    ERR_STREAM_NOT_FOUND,
    OFFSETS_BUCKET,
    OFFSETS_STREAM,
    Link,
    esc,
    group_of,
    offsets_key,
    stream_of,
    subject_of,
    topic_of,
    unesc,
)
from infeed.errors import TopicNotFoundError
from infeed.types import GroupInfo, PartitionInfo, Position, TopicInfo

if TYPE_CHECKING:
    from infeed.brokers.nats import NATSConfig


class Topics:
    """Streams, consumers and the offsets bucket, on behalf of one broker object."""

    def __init__(self, link: Link, config: NATSConfig) -> None:
        self._link = link
        self._cfg = config
        #: topic -> partition count
        self._partitions: dict[str, int] = {}

    def forget(self, topic: str) -> None:
        """Drop what is cached about ``topic`` (it was deleted or re-created elsewhere)."""
        self._partitions.pop(topic, None)

    def _stream_config(self, topic: str, partitions: int) -> dict[str, Any]:
        cfg = self._cfg
        return {
            "name": stream_of(topic),
            "description": f"infeed topic {topic}",
            "subjects": [subject_of(topic, p) for p in range(partitions)],
            "retention": "limits",
            "storage": cfg.storage,
            "num_replicas": cfg.replicas,
            "discard": "old",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": cfg.retention_max_bytes or -1,
            "max_age": int((cfg.retention_max_age_s or 0) * 1e9),
            "max_msgs_per_subject": cfg.retention_max_messages or -1,
            "max_msg_size": -1,
        }

    async def info(self, topic: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return await self._link.api(f"STREAM.INFO.{stream_of(topic)}", body)
        except nats.js.errors.NotFoundError as exc:
            self._partitions.pop(topic, None)
            raise TopicNotFoundError(f"no topic {topic!r}") from exc

    async def partition_count(self, topic: str, *, create: bool, partitions: int | None = None) -> int:
        n = self._partitions.get(topic)
        if n is None:
            try:
                info = await self.info(topic)
            except TopicNotFoundError:
                if not create:
                    raise
                want = self._stream_config(topic, partitions or self._cfg.default_partitions)
                try:
                    info = await self._link.api(f"STREAM.CREATE.{want['name']}", want)
                except nats.js.errors.BadRequestError:
                    info = await self.info(topic)  # made by someone else meanwhile
            n = len(info["config"]["subjects"])
            self._partitions[topic] = n
        return n

    async def delete(self, topic: str) -> None:
        self._partitions.pop(topic, None)
        try:
            await self._link.api(f"STREAM.DELETE.{stream_of(topic)}")
        except nats.js.errors.NotFoundError as exc:
            raise TopicNotFoundError(f"no topic {topic!r}") from exc
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._link.api(
                f"STREAM.PURGE.{OFFSETS_STREAM}", {"filter": f"$KV.{OFFSETS_BUCKET}.{esc(topic)}.>"}
            )

    async def names(self) -> list[str]:
        names: list[str] = []
        while True:
            resp = await self._link.api("STREAM.NAMES", {"offset": len(names)})
            page = resp.get("streams") or []
            names += page
            if not page or len(names) >= resp.get("total", 0):
                break
        return sorted(t for t in map(topic_of, names) if t is not None)

    async def describe(self, topic: str) -> TopicInfo:
        stream = stream_of(topic)
        info = await self.info(topic, {"subjects_filter": f"infeed.{esc(topic)}.*"})
        n = len(info["config"]["subjects"])
        state = info["state"]
        counts = state.get("subjects") or {}
        high = state["last_seq"] + 1
        depth = [int(counts.get(subject_of(topic, p), 0)) for p in range(n)]
        lows = await asyncio.gather(
            *(self._first_seq(topic, p, state) if depth[p] else _const(high) for p in range(n))
        )
        parts = tuple(PartitionInfo(p, lows[p], high, depth[p]) for p in range(n))
        consumers = await self._consumers(stream)
        committed = await self._committed_all(topic)
        names = sorted({g for g, _ in consumers} | set(committed))
        groups = []
        for name in names:
            marks = committed.get(name, {})
            lag = {}
            for p in range(n):
                c = marks.get(p)
                lag[p] = (
                    depth[p] if c is None or c <= lows[p] else await self._count_from(topic, p, c, n, state)
                )
            pending = sum(int(ci.get("num_ack_pending", 0)) for (g, _), ci in consumers.items() if g == name)
            groups.append(GroupInfo(name, marks, lag, pending))
        return TopicInfo(topic, parts, tuple(groups), {"stream": stream})

    async def _first_seq(self, topic: str, partition: int, state: dict[str, Any]) -> int:
        body = {"seq": max(1, state["first_seq"]), "next_by_subj": subject_of(topic, partition)}
        resp = await self._link.api(f"STREAM.MSG.GET.{stream_of(topic)}", body)
        return int(resp["message"]["seq"])

    async def _count_from(
        self, topic: str, partition: int, offset: int, n: int, state: dict[str, Any]
    ) -> int:
        """Messages of one partition at ``offset`` or after."""
        if offset > state["last_seq"]:
            return 0
        if n == 1 and not state.get("num_deleted"):
            return int(state["last_seq"] - max(offset, state["first_seq"]) + 1)
        resp = await self._probe(topic, partition, deliver_policy="by_start_sequence", opt_start_seq=offset)
        return int(resp["num_pending"])

    async def _consumers(self, stream: str) -> dict[tuple[str, int], dict[str, Any]]:
        out: dict[tuple[str, int], dict[str, Any]] = {}
        offset = 0
        while True:
            resp = await self._link.api(f"CONSUMER.LIST.{stream}", {"offset": offset})
            page = resp.get("consumers") or []
            offset += len(page)
            for ci in page:
                parsed = group_of(ci.get("name", ""))
                if parsed is not None:
                    out[parsed] = ci
            if not page or offset >= resp.get("total", 0):
                return out

    async def trim(
        self, topic: str, committed: bool, max_age_s: float | None, max_messages: int | None
    ) -> int:
        stream = stream_of(topic)
        n = len((await self.info(topic))["config"]["subjects"])
        marks: dict[str, dict[int, int]] = {}
        if committed:
            marks = await self._committed_all(topic)
            for g, _ in await self._consumers(stream):
                marks.setdefault(g, {})
        dropped = 0
        for p in range(n):
            subject = subject_of(topic, p)
            keep_from = min((m.get(p, 0) for m in marks.values()), default=0)
            if max_age_s is not None:
                keep_from = max(keep_from, await self._first_after(topic, p, time.time() - max_age_s))
            if keep_from > 1:
                resp = await self._link.api(f"STREAM.PURGE.{stream}", {"filter": subject, "seq": keep_from})
                dropped += int(resp.get("purged", 0))
            if max_messages is not None:
                resp = await self._link.api(
                    f"STREAM.PURGE.{stream}", {"filter": subject, "keep": max_messages}
                )
                dropped += int(resp.get("purged", 0))
        return dropped

    async def _first_after(self, topic: str, partition: int, wall_s: float) -> int:
        """The first sequence of a partition published at ``wall_s`` or later."""
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_s)) + f".{int(wall_s % 1 * 1e9):09d}Z"
        resp = await self._probe(topic, partition, deliver_policy="by_start_time", opt_start_time=at)
        return int(resp["delivered"]["stream_seq"]) + 1

    async def _probe(self, topic: str, partition: int, **start: Any) -> dict[str, Any]:
        """Create and drop a throw-away consumer of one partition: its info counts and locates."""
        stream = stream_of(topic)
        config = {"ack_policy": "none", "filter_subject": subject_of(topic, partition), "mem_storage": True}
        config.update(start, inactive_threshold=int(10e9))
        resp = await self._link.api(f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._link.api(f"CONSUMER.DELETE.{stream}.{resp['name']}")
        return resp

    async def check_positions(self, topic: str, positions: list[Position]) -> None:
        info = await self.info(topic)
        n, high = len(info["config"]["subjects"]), info["state"]["last_seq"] + 1
        for pos in positions:
            if pos.topic != topic:
                raise ValueError(f"position {pos} is not on topic {topic!r}")
            if not 0 <= pos.partition < n:
                raise ValueError(f"position {pos}: no partition {pos.partition}")
            if pos.offset > high:
                raise ValueError(f"position {pos} is past the end of the topic (next offset {high})")

    async def commit(self, topic: str, group: str, positions: list[Position]) -> None:
        await self.check_positions(topic, positions)
        items: list[tuple[str, bytes, dict[str, str] | None]] = [
            (offsets_key(topic, group, p.partition), str(p.offset).encode(), None) for p in positions
        ]

        async def create_bucket(subjects: list[str]) -> None:
            want = {
                "name": OFFSETS_STREAM,
                "subjects": [f"$KV.{OFFSETS_BUCKET}.>"],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "discard": "new",
                "allow_rollup_hdrs": True,
                "deny_delete": True,
                "allow_direct": True,
                "duplicate_window": int(120e9),
                "storage": "file",
                "num_replicas": self._cfg.replicas,
            }
            with contextlib.suppress(nats.js.errors.BadRequestError):  # made meanwhile by another
                await self._link.api(f"STREAM.CREATE.{OFFSETS_STREAM}", want)

        await self._link.publish(items, create_bucket)

    async def committed(self, topic: str, group: str) -> dict[int, Position]:
        n = await self.partition_count(topic, create=False)
        values = await asyncio.gather(*(self._kv_get(offsets_key(topic, group, p)) for p in range(n)))
        return {p: Position(topic, p, v) for p, v in enumerate(values) if v is not None}

    async def _kv_get(self, key: str) -> int | None:
        try:
            resp = await self._link.api(f"STREAM.MSG.GET.{OFFSETS_STREAM}", {"last_by_subj": key})
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code in (ERR_NO_MESSAGE, ERR_STREAM_NOT_FOUND):
                return None
            raise
        return int(base64.b64decode(resp["message"]["data"]))

    async def _committed_all(self, topic: str) -> dict[str, dict[int, int]]:
        """Committed offsets of every group of ``topic``: group -> partition -> offset."""
        prefix = f"$KV.{OFFSETS_BUCKET}.{esc(topic)}."
        try:
            info = await self._link.api(f"STREAM.INFO.{OFFSETS_STREAM}", {"subjects_filter": prefix + ">"})
        except nats.js.errors.NotFoundError:
            return {}
        keys = sorted((info["state"].get("subjects") or {}).keys())
        values = await asyncio.gather(*(self._kv_get(k) for k in keys))
        out: dict[str, dict[int, int]] = {}
        for key, value in zip(keys, values, strict=True):
            group, _, p = key[len(prefix) :].rpartition(".")
            if value is not None and p.isdigit():
                out.setdefault(unesc(group), {})[int(p)] = value
        return out


async def _const(value: int) -> int:
    return value
