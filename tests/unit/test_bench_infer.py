"""The inference bench (figures 4 and 5) on memory:// with tiny counts: what it measures and writes.

Timings are never asserted (BENCHMARKS.md): only names, counts, repetitions, pairings and files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from infeed.bench import infer
from infeed.bench.cli import app

REPS = 3
SIZES = (1, 4)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-infer")
    data = infer.run(
        backends=["memory"],
        sizes=SIZES,
        requests=24,
        seconds=0.05,
        latency_requests=5,
        repetitions=REPS,
        out_dir=out,
        brokers_file=out / "no-brokers.json",
        console=Console(file=io.StringIO(), width=160),
    )
    return data, out


def test_json_and_plots_are_written(result: tuple[dict[str, Any], Path]) -> None:
    data, out = result
    assert json.loads((out / "infer.json").read_text()) == json.loads(json.dumps(data))
    assert (out / "infer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "infer_latency.png").exists()  # no raw baseline on memory://: no overhead to plot
    assert data["figure"] == "infer" and data["targets"] == infer.TARGETS
    assert data["method"]["repetitions"] == REPS
    assert data["skipped"] == []
    assert list(data["results"]) == ["memory"]


def test_throughput_pairs_every_repetition(result: tuple[dict[str, Any], Path]) -> None:
    t = result[0]["results"]["memory"]["throughput"]
    assert list(t["sizes"]) == ["1", "4"]
    for size in t["sizes"].values():
        assert size["requests"] == 24
        rates, model = size["requests_per_s"]["reps"], size["model_rows_per_s"]["reps"]
        assert len(rates) == len(model) == REPS and all(r > 0 for r in rates + model)
        assert size["fraction_of_model"]["reps"] == pytest.approx(
            [r / m for r, m in zip(rates, model, strict=True)]
        )
    speedup = t["speedup_vs_batch1"]
    assert list(speedup) == ["4"]
    assert speedup["4"]["reps"] == pytest.approx(
        [
            a / b
            for a, b in zip(
                t["sizes"]["4"]["requests_per_s"]["reps"],
                t["sizes"]["1"]["requests_per_s"]["reps"],
                strict=True,
            )
        ]
    )


def test_latency_has_both_batcher_settings_and_no_raw_on_memory(result: tuple[dict[str, Any], Path]) -> None:
    lat = result[0]["results"]["memory"]["latency"]
    assert lat["raw"] is False
    assert set(lat["variants"]) == {"infeed", "infeed max_wait_s=0.005"}
    for v in lat["variants"].values():
        assert len(v["p50"]["reps"]) == len(v["p99"]["reps"]) == REPS
        assert v["p50"]["min"] <= v["p50"]["median"] <= v["p50"]["max"]
        assert "p50_added" not in v  # no raw client on memory://: no overhead claimed


def test_a_broker_that_is_not_running_is_skipped_with_a_reason(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=160)
    data = infer.run(
        backends=["redis"], out_dir=tmp_path, brokers_file=tmp_path / "none.json", console=console, plot=False
    )
    assert data["results"] == {}
    assert data["skipped"][0]["backend"] == "redis" and "not running" in data["skipped"][0]["reason"]
    assert "skip redis" in console.file.getvalue()  # type: ignore[attr-defined]


def test_cli_rejects_bad_sizes_and_lists_the_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sizes"):
        infer.run(backends=["memory"], sizes=(1,), out_dir=tmp_path)
    outcome = CliRunner().invoke(app, ["--help"])
    assert outcome.exit_code == 0 and "infer" in outcome.output


def test_raw_sqlite_echo_runs_the_model_on_the_request_bytes(tmp_path: Path) -> None:
    import threading

    import numpy as np
    import torch

    from infeed.bench._echo import raw_echo
    from infeed.bench._infer_serve import mlp_handler
    from infeed.training.models import mlp_784

    path = str(tmp_path / "echo.db")
    responder, requester = raw_echo("sqlite", path, "c"), raw_echo("sqlite", path, "c")
    stop = threading.Event()
    thread = threading.Thread(target=responder.serve, args=(mlp_handler(), stop))
    thread.start()
    try:
        x = np.random.default_rng(1).random((1, 784), dtype=np.float32)
        outputs = [np.frombuffer(requester.request(x.tobytes(), 10.0), dtype=np.float32) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
        responder.close()
        requester.close()
    torch.manual_seed(0)
    with torch.inference_mode():
        expected = mlp_784().eval()(torch.from_numpy(x)).numpy()[0]
    for out in outputs:
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no raw round trip"):
        raw_echo("nats", "nats://x", "c")
