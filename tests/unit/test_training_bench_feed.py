"""``bench train-feed`` on memory:// with tiny counts: what it writes (timings are never asserted)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from rich.console import Console

from infeed.bench import train_feed


def test_train_feed_writes_every_variant_with_ratios(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    data = train_feed.run(
        backends=["memory"],
        steps=2,
        repetitions=1,
        out_dir=tmp_path,
        brokers_file=tmp_path / "none.json",
        console=Console(file=io.StringIO(), width=200),
        plot=False,
    )
    assert torch.get_num_threads() == threads  # restored
    assert json.loads((tmp_path / "train_feed.json").read_text()) == data
    memory = data["results"]["memory"]
    assert list(memory) == list(train_feed.VARIANTS)
    assert memory["tensors"]["ratio_to_tensors"]["median"] == 1.0
    for name, result in memory.items():
        assert len(result["samples_per_s"]["reps"]) == 1, name
        assert result["ratio_to_tensors"]["median"] > 0, name
    assert "checkpoint_cost" in memory[f"infeed rb64 ckpt/{train_feed.CHECKPOINT_EVERY_STEPS}"]
