"""CheckpointStore: atomic folders, LATEST as the truth, recovery, pruning; optimizer state files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infeed.training import CheckpointStore
from infeed.training._optim import optimizer_from_files, optimizer_to_files
from infeed.training.checkpoint import LATEST_FILE


def test_write_then_latest_reads_it_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    phases: list[str] = []
    store.write(3, {"a.bin": b"abc", "b.bin": lambda path: path.write_bytes(b"xy")}, on_phase=phases.append)
    found = store.latest()
    assert found is not None and found.step == 3 and found.path.name == "step-0000000003"
    assert found.read_bytes("a.bin") == b"abc" and found.read_bytes("b.bin") == b"xy"
    assert dict(found.files) == {"a.bin": 3, "b.bin": 2}
    assert phases == ["wrote:a.bin", "wrote:b.bin", "written", "renamed", "latest"]
    with pytest.raises(KeyError, match="no file"):
        found.read_bytes("c.bin")


def test_latest_is_the_truth_and_recovery_removes_the_rest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.write(1, {"a": b"1"})
    store.write(2, {"a": b"2"})
    # A crash after the rename of step 3 but before LATEST moved, and one inside step 4's write.
    (tmp_path / LATEST_FILE).write_text("step-0000000002\n")
    store.write(3, {"a": b"3"})
    (tmp_path / LATEST_FILE).write_text("step-0000000002\n")
    (tmp_path / ".tmp-step-0000000004").mkdir()
    store.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-0000000001", "step-0000000002"]
    found = store.latest()
    assert found is not None and found.read_bytes("a") == b"2"


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3):
        store.write(step, {"a": b"x"})
        store.prune()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000000002", "step-0000000003"]


def test_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    found = store.write(1, {"a": b"abc"})
    (found.path / "a").write_bytes(b"ab")
    with pytest.raises(ValueError, match="manifest says 3"):
        store.latest()
    (tmp_path / LATEST_FILE).write_text("../etc\n")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        store.latest()
    with pytest.raises(ValueError, match="file name"):
        store.write(2, {"../x": b""})


def test_optimizer_state_round_trips_without_pickle() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        torch.autograd.backward(model(torch.randn(4, 3)).sum())
        opt.step()
    tensors, meta = optimizer_to_files(opt)
    assert json.loads(meta)["param_groups"][0]["betas"] == {"tuple": [0.8, 0.9]}
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    optimizer_from_files(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][pid][key])
