"""The slice of Pulsar's admin REST API that ``pulsar://`` needs, over ``urllib`` (no extra library).

The binary protocol of pulsar-client cannot create partitioned topics, read stats or store
subscription properties; the broker's web service can. Every call retries with backoff while the
broker is unreachable (``Retry``) and maps errors through ``_map_errors``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from infeed.brokers._pulsar_wire import AdminHTTPError, Retry, _map_errors, pack, retrying, unpack
from infeed.errors import TopicNotFoundError
from infeed.types import PartitionInfo

__all__ = ["COMMITTED_PROPERTY", "Admin", "entries_from", "extent"]

#: Subscription property holding a group's committed resume offset on one partition.
COMMITTED_PROPERTY = "infeed.committed"
_EARLIEST = {"ledgerId": -1, "entryId": -1}
_LATEST = {"ledgerId": 2**63 - 1, "entryId": 2**63 - 1}


class Admin:
    """Admin calls on one namespace (``tenant/namespace``) of one broker's web service."""

    def __init__(self, base_url: str, namespace: str, *, timeout_s: float, retry: Retry, where: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.namespace = namespace
        self._timeout_s = timeout_s
        self._retry = retry
        self._where = where

    def topic_path(self, topic: str) -> str:
        """The REST path of a topic (or of one partition: ``NAME-partition-I``)."""
        return f"/admin/v2/persistent/{self.namespace}/{quote(topic, safe='')}"

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """Call the API (retrying while the broker is unreachable); return the decoded JSON.

        Raises:
            TopicNotFoundError: on HTTP 404.
            AdminHTTPError: on another error status (``status`` says which).
            BrokerConnectionError: if the broker stays unreachable past the retries.
        """

        def once() -> Any:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(
                self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            with _map_errors(self._where), urllib.request.urlopen(req, timeout=self._timeout_s) as resp:
                if raw:
                    return dict(resp.headers.items())
                text = resp.read()
            return json.loads(text) if text else None

        return retrying(self._retry, self.base_url, f"admin {method} {path}", once)

    # -- topics -------------------------------------------------------------------------------

    def partitions(self, topic: str) -> int | None:
        """Partition count of ``topic``: None if missing, 0 if it is not partitioned."""
        try:
            meta = self.request("GET", f"{self.topic_path(topic)}/partitions")
        except TopicNotFoundError:
            return None
        return int(meta["partitions"])

    def create_topic(self, topic: str, partitions: int) -> bool:
        """Create a partitioned topic; False if something of that name already exists."""
        try:
            self.request("PUT", f"{self.topic_path(topic)}/partitions", partitions)
        except AdminHTTPError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def ensure_namespace(self, minutes: int, size_mb: int) -> bool:
        """Create the namespace if missing, keeping acknowledged messages ``minutes`` / ``size_mb``.

        The retention is a namespace policy, kept in the metadata store: topic-level policies
        live in the ``__change_events`` system topic, which a SIGKILLed standalone can leave
        unreadable, and then no topic of the namespace loads. An existing namespace keeps its
        own policies. Returns whether it was created.
        """
        path = f"/admin/v2/namespaces/{self.namespace}"
        try:
            self.request("PUT", path, {})
        except AdminHTTPError as exc:
            if exc.status != 409:
                raise
            return False
        body = {"retentionTimeInMinutes": minutes, "retentionSizeInMB": size_mb}
        self.request("POST", f"{path}/retention", body)
        return True

    def delete_topic(self, topic: str) -> None:
        """Delete a partitioned topic with its subscriptions (TopicNotFoundError if missing)."""
        self.request("DELETE", f"{self.topic_path(topic)}/partitions?force=true")

    def list_topics(self) -> list[str]:
        """Short names of the partitioned topics of the namespace."""
        names = self.request("GET", f"/admin/v2/persistent/{self.namespace}/partitioned")
        return [str(n).rsplit("/", 1)[-1] for n in names or ()]

    def stats(self, topic: str) -> dict[str, Any]:
        """Per-partition stats (subscriptions with backlog, unacked counts and properties)."""
        out: dict[str, Any] = self.request(
            "GET", f"{self.topic_path(topic)}/partitioned-stats?perPartition=true"
        )
        return out

    def internal_stats(self, topic: str) -> dict[str, Any]:
        """Per-partition managed-ledger stats (ledgers, entries, last confirmed entry)."""
        out: dict[str, Any] = self.request("GET", f"{self.topic_path(topic)}/partitioned-internalStats")
        return out

    def batch_size(self, partition_topic: str, ledger: int, entry: int) -> int:
        """Messages in entry ``(ledger, entry)``: 1 if it is not a batch, 0 if there is no such entry."""
        try:
            headers = self.request(
                "GET", f"{self.topic_path(partition_topic)}/ledger/{ledger}/entry/{entry}", raw=True
            )
        except (TopicNotFoundError, AdminHTTPError):
            return 0
        lowered = {k.lower(): v for k, v in headers.items()}
        return int(lowered.get("x-pulsar-num-batch-message", 1))

    # -- subscriptions ------------------------------------------------------------------------

    def create_subscription(self, topic: str, group: str, *, latest: bool) -> None:
        """Create ``group`` on every partition at the start or the end (no-op if it exists)."""
        try:
            self.request(
                "PUT",
                f"{self.topic_path(topic)}/subscription/{quote(group, safe='')}",
                _LATEST if latest else _EARLIEST,
            )
        except AdminHTTPError as exc:
            if exc.status != 409:
                raise

    def properties(self, partition_topic: str, group: str) -> dict[str, str]:
        """The properties of subscription ``group`` on one partition."""
        out = self.request(
            "GET", f"{self.topic_path(partition_topic)}/subscription/{quote(group, safe='')}/properties"
        )
        return {str(k): str(v) for k, v in (out or {}).items()}

    def set_properties(self, partition_topic: str, group: str, properties: dict[str, str]) -> None:
        """Replace the properties of subscription ``group`` on one partition (stored with its cursor)."""
        self.request(
            "PUT",
            f"{self.topic_path(partition_topic)}/subscription/{quote(group, safe='')}/properties",
            properties,
        )

    def reset_cursor(self, partition_topic: str, group: str, ledger: int, entry: int) -> None:
        """Move subscription ``group`` on one partition so ``(ledger, entry)`` is delivered next."""
        body = {
            "ledgerId": ledger,
            "entryId": entry,
            "partitionIndex": -1,
            "batchIndex": -1,
            "isExcluded": False,
        }
        self.request(
            "POST",
            f"{self.topic_path(partition_topic)}/subscription/{quote(group, safe='')}/resetcursor",
            body,
        )

    def last_message_id(self, partition_topic: str) -> tuple[int, int, int]:
        """``(ledger, entry, batch index)`` of the last message of one partition.

        Entry -1: none in that ledger. Batch index -1: the entry is not a batch.
        """
        out = self.request("GET", f"{self.topic_path(partition_topic)}/lastMessageId")
        return int(out["ledgerId"]), int(out["entryId"]), int(out.get("batchIndex", -1))


def extent(
    partition: int,
    stats: dict[str, Any],
    messages_in: Callable[[int, int], int] = lambda ledger, entry: 1,
) -> tuple[PartitionInfo, list[tuple[int, int]]]:
    """A partition's extent and its ledgers ``(ledger id, entries)`` from its internal stats.

    ``high`` is one past the last message written (its offset + 1), as ``PartitionInfo`` says,
    not the first offset of the next entry: offsets are sparse, and a reader that reaches the
    end tells it by ``offset + 1 >= high``. ``messages_in(ledger, entry)`` counts the messages of
    the last entry (more than 1 for a batch).
    """
    ledger_text, _, entry_text = str(stats.get("lastConfirmedEntry", "0:-1")).partition(":")
    last_ledger, last_entry = max(int(ledger_text), 0), int(entry_text or -1)
    ledgers = [(int(x["ledgerId"]), int(x.get("entries", 0))) for x in stats.get("ledgers", [])]
    if ledgers:  # the open ledger reports 0 entries until it is closed
        ledgers[-1] = (ledgers[-1][0], int(stats.get("currentLedgerEntries", ledgers[-1][1])))
    if last_entry < 0:  # a new ledger holds nothing yet: the last entry is in an earlier one
        written = [(ledger, n - 1) for ledger, n in ledgers if n > 0 and ledger < last_ledger]
        last_ledger, last_entry = written[-1] if written else (last_ledger, -1)
    if last_entry < 0:
        high = pack(last_ledger, 0, 0)
    else:
        high = pack(last_ledger, last_entry, max(messages_in(last_ledger, last_entry), 1) - 1) + 1
    depth = int(stats.get("numberOfEntries", 0))
    first = next((ledger for ledger, n in ledgers if n > 0), None)
    low = pack(first, 0, 0) if depth and first is not None else high
    return PartitionInfo(partition, low, high, depth), ledgers


def entries_from(ledgers: list[tuple[int, int]], offset: int) -> int:
    """Entries at or after ``offset`` (an entry counts when its first message is at or after it)."""
    ledger, entry, batch = unpack(offset)
    first = entry + (1 if batch else 0)
    return sum(n if lid > ledger else max(0, n - first) if lid == ledger else 0 for lid, n in ledgers)
