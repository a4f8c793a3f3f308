"""scripts/harness/kafka.py: cluster ids the storage tool accepts."""

from __future__ import annotations

import base64
import uuid

import pytest

from tests.support import harness


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64url "-AAA...": read as an option
    plain = uuid.UUID(bytes=bytes(range(16)))
    assert base64.urlsafe_b64encode(dash.bytes).startswith(b"-")
    drawn = iter([dash, dash, plain])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    cluster_id = harness("kafka").new_cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(plain.bytes).decode().rstrip("=")
    assert len(cluster_id) == 22


def test_cluster_ids_differ() -> None:
    ids = {harness("kafka").new_cluster_id() for _ in range(200)}
    assert len(ids) == 200 and not any(i.startswith("-") for i in ids)
