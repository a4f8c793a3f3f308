"""The bench machinery on memory:// and sqlite:// with tiny counts: structure of what it writes.

Timings are never asserted (BENCHMARKS.md): only names, counts, repetitions and that ratios exist.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from infeed.bench import _brokers_report as report
from infeed.bench import brokers, harness
from infeed.bench.cli import app
from infeed.bench.payloads import PAYLOADS, payload
from infeed.codecs import MsgpackCodec, decode_message, default_registry

REPS = 3
MESSAGES = 500


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    data = brokers.run(
        backends=["memory", "sqlite"],
        repetitions=REPS,
        messages=MESSAGES,
        out_dir=out,
        brokers_file=out / "no-brokers.json",
        console=quiet(),
    )
    return data, out


def test_json_written_matches_the_returned_data(result: tuple[dict[str, Any], Path]) -> None:
    data, out = result
    assert json.loads((out / "brokers.json").read_text()) == json.loads(json.dumps(data))
    assert (out / "brokers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_level_structure(result: tuple[dict[str, Any], Path]) -> None:
    data, _ = result
    assert data["figure"] == "brokers"
    assert data["target_ratio"] == brokers.TARGET_RATIO
    assert data["method"]["repetitions"] == REPS
    assert data["method"]["batch"] == brokers.BATCH
    machine = data["machine"]
    for key in ("cpu_count", "python", "sqlite", "versions", "timestamp", "load_average"):
        assert key in machine
    assert "redis" in machine["versions"]
    assert set(data["payloads"]) == set(PAYLOADS)
    assert data["payloads"]["msg-1k"]["bytes"] == 1024
    assert set(data["backends"]) == {"memory", "sqlite"}
    assert data["backends"]["memory"]["raw"] is None
    assert data["backends"]["sqlite"]["raw"]
    assert data["skipped"] == []


def test_one_row_per_backend_payload_and_op(result: tuple[dict[str, Any], Path]) -> None:
    data, _ = result
    keys = [(r["backend"], r["payload"], r["op"]) for r in data["results"]]
    expected = [(b, p, op) for b in ("memory", "sqlite") for p in PAYLOADS for op in ("produce", "consume")]
    assert keys == expected
    for row in data["results"]:
        assert row["messages"] == MESSAGES
        assert len(row["infeed"]["seconds"]) == REPS
        assert len(row["infeed"]["msgs_per_s"]) == REPS
        summary = row["infeed"]["summary"]
        assert summary["min"] <= summary["median"] <= summary["max"]


def test_memory_has_absolute_numbers_and_no_ratio(result: tuple[dict[str, Any], Path]) -> None:
    data, _ = result
    for row in data["results"]:
        if row["backend"] == "memory":
            assert row["raw"] is None
            assert row["ratio"] is None
            assert row["verdict"] == "no baseline"


def test_sqlite_has_raw_reps_and_paired_ratios(result: tuple[dict[str, Any], Path]) -> None:
    data, _ = result
    rows = [r for r in data["results"] if r["backend"] == "sqlite"]
    assert rows
    for row in rows:
        raw, ratio = row["raw"], row["ratio"]
        assert len(raw["msgs_per_s"]) == REPS
        assert raw["best_variant"] in raw["variants"]
        for variant in raw["variants"].values():
            assert len(variant["seconds"]) == REPS
        assert len(ratio["reps"]) == REPS
        assert ratio["reps"] == pytest.approx(
            [i / r for i, r in zip(row["infeed"]["msgs_per_s"], raw["msgs_per_s"], strict=True)]
        )
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        assert row["verdict"] in ("meets", "below")
    consume = next(r for r in rows if r["op"] == "consume")
    assert set(consume["raw"]["variants"]) == {"consume", "consume-mark"}


def test_rows_pair_each_repetition_with_the_best_raw_variant() -> None:
    times = {
        "infeed": {"produce": [1.0, 2.0, 4.0], "consume": [1.0, 1.0, 1.0]},
        "raw": {"produce": [1.0, 1.0, 1.0], "consume": [2.0, 0.5, 4.0], "consume-push": [1.0, 1.0, 8.0]},
    }
    rows = report.rows(
        "x",
        payload("msg-1k"),
        100,
        times,
        {"infeed": "i", "raw": "r"},
        {"produce": ("produce",), "consume": ("consume", "consume-push")},
        0.8,
    )
    produce, consume = rows
    assert produce["ratio"]["reps"] == pytest.approx([1.0, 0.5, 0.25])
    assert produce["verdict"] == "below"
    # per repetition the faster raw variant counts: 1 s, 0.5 s, 4 s
    assert consume["raw"]["msgs_per_s"] == pytest.approx([100.0, 200.0, 25.0])
    assert consume["ratio"]["reps"] == pytest.approx([1.0, 0.5, 4.0])
    assert consume["ratio"]["median"] == pytest.approx(1.0)
    assert consume["verdict"] == "meets"


def test_discover_skips_with_reasons(tmp_path: Path) -> None:
    state = tmp_path / "brokers.json"
    state.write_text(json.dumps({"kafka": {"urls": {"url": "kafka://127.0.0.1:1"}}}))
    chosen, skipped = brokers.discover(["memory", "pulsar"], state)
    assert [b.name for b, _ in chosen] == ["memory"]
    assert [s["backend"] for s in skipped] == ["pulsar"]
    assert "not running" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="unknown backend"):
        brokers.discover(["nope"], state)


def test_payloads_are_the_reference_workloads() -> None:
    msg = payload("msg-1k")
    assert len(msg.data) == 1024 and msg.headers is None
    sample = payload("sample-784")
    assert 3000 < len(sample.data) < 3300
    assert sample.headers is not None
    batch = decode_message(sample.data, sample.headers, default_registry())
    assert batch.columns["x"].shape == (1, 784)
    assert MsgpackCodec().decode(sample.data)["y"] == 7
    assert [len(b) for b in msg.batches(1200, 500)] == [500, 500, 200]
    with pytest.raises(ValueError, match="unknown payload"):
        payload("msg-2k")


def test_harness_statistics() -> None:
    assert harness.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert harness.paired_ratios([2.0, 3.0], [1.0, 4.0]) == [2.0, 0.75]
    with pytest.raises(ValueError):
        harness.paired_ratios([1.0], [0.0])
    with pytest.raises(ValueError):
        harness.summarize([])


def test_cli_brokers_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["brokers", "-b", "memory", "-p", "msg-1k", "-n", "500", "-r", "1", "--out", str(out)]
    outcome = CliRunner().invoke(app, [*args, "--brokers-file", str(tmp_path / "none.json")])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads((out / "brokers.json").read_text())
    assert [(r["backend"], r["op"]) for r in data["results"]] == [
        ("memory", "produce"),
        ("memory", "consume"),
    ]
    assert "Figure 1" in outcome.output


def test_cli_rejects_an_unknown_backend(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["brokers", "-b", "nope", "--out", str(tmp_path)])
    assert outcome.exit_code != 0
    assert "unknown backend" in outcome.output
