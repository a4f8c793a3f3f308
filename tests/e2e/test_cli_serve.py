"""``infeed serve`` and ``infeed predict`` as a user runs them: real processes on sqlite://."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from infeed.inference import ModelRegistry
from infeed.training.models import mlp
from tests.e2e.test_cli import run_infeed
from tests.support import child_env

KWARGS = {"in_features": 4, "hidden": [3], "out_features": 2}


def test_serve_then_predict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(4, (3,), 2)
    ModelRegistry(tmp_path / "reg").publish(
        "digits", model, version=7, factory="infeed.training.models:mlp", kwargs=KWARGS
    )
    url = f"sqlite:///{tmp_path}/q.db"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infeed",
            "--broker",
            url,
            "serve",
            "--model",
            "digits",
            "--registry-dir",
            "reg",
        ],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        assert "serving digits version 7" in server.stderr.readline()
        np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
        result = run_infeed("--broker", url, "predict", "--model", "digits", "--input", "x.npy", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["model_version"] == 7
        with torch.no_grad():
            expected = model(torch.ones(2, 4)).numpy()
        np.testing.assert_allclose(np.array(reply["outputs"]["output"]), expected, rtol=1e-6)
        bad = run_infeed("--broker", url, "predict", "-m", "digits", "-i", "[[1, 2]]", cwd=tmp_path)
        assert bad.returncode == 1 and "error: MODEL_ERROR" in bad.stderr
        missing = run_infeed("--broker", url, "predict", "-m", "digits", "-i", "{oops", cwd=tmp_path)
        assert missing.returncode == 1 and "--input is neither a .npy file nor JSON" in missing.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        if server.stderr is not None:
            server.stderr.close()
    none = run_infeed("--broker", url, "serve", "--model", "nope", "--registry-dir", "reg", cwd=tmp_path)
    assert none.returncode == 1 and "no model 'nope'" in none.stderr
