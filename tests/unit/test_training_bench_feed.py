"""``bench train-feed`` on memory:// with tiny counts: what it writes (timings are never asserted)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from infeed.bench import train_feed
from infeed.bench._feed_loops import PeakRss
from infeed.bench._proc_cpu import broker_pids, tree_cpu_s


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


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's high-water marks")
def test_peak_rss_counts_a_freed_peak_and_a_live_child() -> None:
    mib = 2**20
    hold = (
        "import sys; a = bytearray(48 * 2**20); a[::4096] = b'x' * len(a[::4096]); "
        "print(1, flush=True); sys.stdin.read()"
    )
    with PeakRss() as rss:
        block = bytearray(32 * mib)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        del block  # freed before the block ends: its peak still counts
        child = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"1"
            rss.note_children()
        finally:
            child.communicate(b"")
    assert rss.growth is not None
    assert rss.growth >= (32 + 48) * mib


def test_broker_cpu_counts_a_process_tree_and_pids_come_from_the_state_file(tmp_path: Path) -> None:
    busy = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    busy += "print(1, flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        assert tree_cpu_s([child.pid]) >= 0.3
        assert tree_cpu_s([os.getpid()]) >= tree_cpu_s([child.pid])  # a child is in its parent's tree
    finally:
        child.communicate(b"")
    state = tmp_path / "brokers.json"
    state.write_text(json.dumps({"redis": {"pids": [12, 34]}}))
    assert broker_pids("redis", state) == [12, 34]
    assert broker_pids("kafka", state) == []
    assert broker_pids("redis", tmp_path / "missing.json") == []
