"""``infeed score`` as a user runs it: a backfill that ends when idle, and refusals as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from infeed.brokers import connect
from infeed.codecs import RecordBatch, decode_message, default_registry
from infeed.inference import ModelRegistry
from infeed.training.models import mlp
from tests.e2e.test_cli import run_infeed

KWARGS = {"in_features": 4, "hidden": [3], "out_features": 2}


def test_score_a_topic_then_refuse_the_same_topic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(4, (3,), 2)
    ModelRegistry(tmp_path / "reg").publish(
        "digits", model, version=5, factory="infeed.training.models:mlp", kwargs=KWARGS
    )
    url = f"sqlite:///{tmp_path}/q.db"
    (tmp_path / "s.json").write_text(
        json.dumps({"id": {"dtype": "int64"}, "x": {"dtype": "float32", "shape": [4]}})
    )
    lines = "".join(json.dumps({"id": i, "x": [i, 0, 1, 2]}) + "\n" for i in range(3))
    (tmp_path / "in.jsonl").write_text(lines)
    produced = run_infeed(
        "--broker", url, "produce", "in.jsonl", "--topic", "in", "--schema", "s.json", cwd=tmp_path
    )
    assert produced.returncode == 0, produced.stderr
    args = ["--broker", url, "score", "--in", "in", "--out", "out", "-m", "digits", "--registry-dir", "reg"]
    result = run_infeed(*args, "--schema", "s.json", "--id-field", "id", "--idle-exit-s", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scored 3 records" in result.stderr
    with connect(url) as broker:
        got = broker.subscribe("out", group="check").receive(max_messages=10, timeout_s=1.0)
    batch = RecordBatch.concat(decode_message(d.payload, d.headers, default_registry()) for d in got)
    assert batch.columns["id"].tolist() == [0, 1, 2]
    assert set(batch.columns["model_version"].tolist()) == {5}
    x = torch.tensor([[i, 0, 1, 2] for i in range(3)], dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(batch.columns["output"], model(x).numpy(), rtol=1e-6)
    bad = run_infeed(
        "--broker",
        url,
        "score",
        "--in",
        "in",
        "--out",
        "in",
        "-m",
        "digits",
        "--registry-dir",
        "reg",
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "must differ" in bad.stderr
