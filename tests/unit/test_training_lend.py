"""Batches lent as views of the feed's ring: the ring gets them back in order, only once freed."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from infeed.training import QueueDataset
from infeed.training._lend import Lender
from tests.unit.test_training_feed import SCHEMA, fill


def test_regions_come_back_in_ring_order_once_read_and_no_longer_referenced() -> None:
    released: list[int] = []
    lender = Lender(released.append, 1000)
    first, second = np.zeros(4), np.zeros(4)
    lender.lend(100, [first, second])
    lender.read(100)
    lender.read(200)  # nothing lent from it, but it must wait for the region before it
    assert released == [] and lender.held_back() == 200
    tensor = torch.from_numpy(first)  # a tensor keeps its array (and so the region) alive
    del first, second
    gc.collect()
    assert released == [] and lender.held_back() == 200
    del tensor
    assert released == [100, 200] and lender.held_back() == 0
    view = np.zeros(4)
    lender.lend(300, [view])
    del view  # returned before it was read whole: released once read
    assert released == [100, 200]
    lender.read(300)
    assert released == [100, 200, 300] and lender.lent_batches == 2


def _dataset(url: str, group: str, max_messages: int = 256) -> QueueDataset:
    # A ring of 16 KiB: the 2,000 records (20 bytes each) wrap it several times.
    return QueueDataset(
        url,
        "t",
        group=group,
        schema=SCHEMA,
        batch_size=10,
        epochs=1,
        prefetch_bytes=16 * 1024,
        max_messages=max_messages,
    )


# Two messages of 64 per receive: chunks that fit the small ring (a bigger one goes by the pipe).
@pytest.mark.parametrize(("per_message", "max_messages"), [(1, 256), (64, 2)])
def test_lent_batches_hold_their_records_for_as_long_as_they_are_kept(
    tmp_path: Path, per_message: int, max_messages: int
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    fill(url, 2000, per_message)
    kept: list[dict[str, torch.Tensor]] = []
    seen: list[int] = []
    with _dataset(url, "g", max_messages) as ds:
        assert ds.feed == "process"
        for batch in ds.iter_lent(["x"]):
            seen.extend(batch["id"].tolist())
            kept = [*kept[-4:], batch]  # a few batches kept past their step
            for held in kept:  # never overwritten while referenced
                assert torch.equal(held["x"][:, 0].long(), held["id"])
                assert torch.equal(held["x"][:, 2].long(), held["id"])
        assert ds._lender is not None and ds._lender.lent_batches > 100
    assert seen == list(range(2000))


def test_batches_kept_past_half_the_ring_stop_the_iteration_naming_the_cause(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    fill(url, 2000, 1)
    kept: list[dict[str, torch.Tensor]] = []
    with _dataset(url, "g") as ds, pytest.raises(RuntimeError, match="still referenced"):
        for batch in ds.iter_lent(["x"]):
            kept.append(batch)
    assert kept and len(kept) < 200
    for held in kept:  # what was kept is intact: the feed waited instead of overwriting it
        assert torch.equal(held["x"][:, 0].long(), held["id"])


def test_lending_an_unknown_field_is_refused(tmp_path: Path) -> None:
    with _dataset(f"sqlite:///{tmp_path / 'q.db'}", "g") as ds, pytest.raises(ValueError, match="nope"):
        ds.iter_lent(["nope"])
