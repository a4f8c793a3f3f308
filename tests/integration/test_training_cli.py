"""``infeed datasets produce digits`` then ``infeed train``: a model visibly learns from a stream."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from infeed.cli.app import app
from infeed.training import ModelRegistry

KWARGS = json.dumps({"in_features": 64, "hidden": [64], "out_features": 10})


def test_produce_digits_then_train_then_resume(tmp_path: Path) -> None:
    runner = CliRunner()
    url = f"sqlite:///{tmp_path}/q.db"
    schema = tmp_path / "digits.schema.json"
    produced = runner.invoke(
        app, ["--broker", url, "datasets", "produce", "digits", "--schema-out", str(schema)]
    )
    assert produced.exit_code == 0, produced.output
    assert "1,797 records" in produced.output
    threads = torch.get_num_threads()
    args = ["--broker", url, "train", "--model", "infeed.training.models:mlp", "--model-kwargs", KWARGS]
    args += ["--topic", "digits", "--schema", str(schema), "--checkpoint-dir", str(tmp_path / "ckpt")]
    args += [
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--checkpoint-every-steps",
        "50",
        "--threads",
        "1",
    ]
    args += ["--registry-dir", str(tmp_path / "reg"), "--model-name", "digits"]
    try:
        trained = runner.invoke(app, args)
        again = runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert trained.exit_code == 0, trained.output
    found = re.search(r"trained (\d+) steps this run .*last loss ([\d.]+)", trained.output)
    assert found is not None, trained.output
    steps, loss = int(found.group(1)), float(found.group(2))
    assert steps == -(-4 * 1797 // 64)  # 4 epochs of 1,797 samples, batches of 64 across epochs
    assert loss < 1.0  # from ~2.3 (10 classes at random): it learned
    assert again.exit_code == 0, again.output
    assert f"resumed from the checkpoint after step {steps}" in again.output
    assert "trained 0 steps this run" in again.output
    model = ModelRegistry(tmp_path / "reg").load("digits")
    assert model(torch.zeros(1, 64)).shape == (1, 10)
