"""The ``infeed`` command line, run for real in subprocesses (``python -m infeed``) on a tmp SQLite file."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infeed.cli._digits import load_digits
from infeed.cli._roundtrip import RoundTripCheck
from infeed.codecs import RecordBatch
from tests.support import child_env

Cli = Callable[..., subprocess.CompletedProcess[str]]


def run_infeed(
    *args: str, cwd: Path, stdin: str = "", env: dict[str, str] | None = None, timeout_s: float = 90
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in child_env().items() if not k.startswith("INFEED_")}
    full_env["COLUMNS"] = "200"  # rich tables stay on one line per row
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "infeed", *args],
        cwd=cwd,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/q.db"


@pytest.fixture
def cli(tmp_path: Path, url: str) -> Cli:
    """Run ``infeed --broker URL ARGS`` in tmp_path."""

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_infeed("--broker", url, *args, cwd=tmp_path, stdin=stdin)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def without_position(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "_position"} for r in records]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert text in lines[0]


# -- the app -------------------------------------------------------------------------------------


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = ok(run_infeed("--help", cwd=tmp_path))
    for command in ("produce", "consume", "topics", "demo"):
        assert command in result.stdout
    assert ok(run_infeed("--version", cwd=tmp_path)).stdout.startswith("infeed ")
    assert ok(run_infeed("topics", "--help", cwd=tmp_path)).stdout.count("delete") >= 1


def test_user_errors_are_one_red_line_with_exit_codes(tmp_path: Path, cli: Cli) -> None:
    assert_one_line_error(
        run_infeed("--broker", "foo://x", "topics", "list", cwd=tmp_path), 2, "unknown broker scheme 'foo'"
    )
    assert_one_line_error(
        cli("produce", "missing.jsonl", "--topic", "t"), 1, "No such file or directory: missing.jsonl"
    )
    assert_one_line_error(cli("topics", "describe", "nope"), 1, "no topic 'nope'")
    assert_one_line_error(cli("consume", "--topic", "nope", "--group", "g"), 1, "infeed topics create nope")
    assert_one_line_error(cli("topics", "create", "bad name!"), 1, "bad name!")
    (tmp_path / "infeed.toml").write_text("[infeed]\nbrokr = 'x'\n")
    assert_one_line_error(run_infeed("topics", "list", cwd=tmp_path), 2, "did you mean 'broker'?")
    usage = cli("consume", "--topic", "t", "--group", "g", "--from", "t:zero")
    assert (
        usage.returncode == 2 and "Traceback" not in usage.stderr and "TOPIC:PARTITION:OFFSET" in usage.stderr
    )


def test_broker_url_precedence_flag_then_env_then_toml(tmp_path: Path) -> None:
    (tmp_path / "infeed.toml").write_text(f'[infeed]\nbroker = "sqlite:///{tmp_path}/toml.db"\n')
    env = {"INFEED_BROKER": f"sqlite:///{tmp_path}/env.db"}
    ok(run_infeed("topics", "create", "from-toml", cwd=tmp_path))
    ok(run_infeed("topics", "create", "from-env", cwd=tmp_path, env=env))
    ok(
        run_infeed(
            "--broker",
            f"sqlite:///{tmp_path}/flag.db",
            "topics",
            "create",
            "from-flag",
            cwd=tmp_path,
            env=env,
        )
    )
    ok(
        run_infeed(
            "topics",
            "create",
            "flag-after",
            "--broker",
            f"sqlite:///{tmp_path}/late.db",
            cwd=tmp_path,
            env=env,
        )
    )
    for name, topic in [
        ("toml", "from-toml"),
        ("env", "from-env"),
        ("flag", "from-flag"),
        ("late", "flag-after"),
    ]:
        listed = ok(
            run_infeed("--broker", f"sqlite:///{tmp_path}/{name}.db", "topics", "list", cwd=tmp_path)
        ).stdout
        assert topic in listed
        assert {"from-toml", "from-env", "from-flag", "flag-after"} - {topic} & set(listed.split()) == set()


# -- topics --------------------------------------------------------------------------------------


def test_topics_create_list_describe_delete(cli: Cli) -> None:
    assert "created" in ok(cli("topics", "create", "events", "--partitions", "3")).stdout
    assert "exists" in ok(cli("topics", "create", "events", "--partitions", "3")).stdout
    assert_one_line_error(cli("topics", "create", "events", "--partitions", "2"), 1, "3 partitions, not 2")
    row = next(line for line in ok(cli("topics", "list")).stdout.splitlines() if "events" in line)
    assert row.split("│")[1:4] == [" events ", "          3 ", "     0 "]
    described = ok(cli("topics", "describe", "events")).stdout
    assert "3 partitions, 0 messages" in described and "no consumer groups" in described

    refused = cli("topics", "delete", "events")  # stdin is empty: the prompt gets no "y"
    assert refused.returncode == 1 and "events" in ok(cli("topics", "list")).stdout
    assert "deleted" in ok(cli("topics", "delete", "events", "--yes")).stdout
    assert "no topics" in ok(cli("topics", "list")).stdout


# -- produce -------------------------------------------------------------------------------------

GOOD = [
    {"x": [1.5, 2.0, -3.25], "label": 1, "name": "ann"},
    {"x": [0.0, 1.0, 2.0], "label": 2, "name": "bob"},
    {"x": [4.0, 5.0, 6.0], "label": 3, "name": "cy"},
    {"x": [7.0, 8.0, 9.0], "label": 4, "name": "dee"},
]


def write_jsonl(path: Path) -> None:
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), '{"x": [1, 2', json.dumps(GOOD[2])]
    lines += ['{"x": [1.0, 2.0], "label": 5, "name": "short"}', "", json.dumps(GOOD[3])]
    path.write_text("\n".join(lines) + "\n")


def test_produce_jsonl_reports_bad_lines_and_consume_gets_the_rest_back(tmp_path: Path, cli: Cli) -> None:
    write_jsonl(tmp_path / "data.jsonl")
    result = ok(cli("produce", "data.jsonl", "--topic", "t", "--records-per-message", "3"))
    assert "data.jsonl:3: invalid JSON" in result.stderr
    assert "data.jsonl:5: field 'x': expected shape (3,), got (2,)" in result.stderr
    summary = dict(line.split(None, 1) for line in result.stdout.splitlines()[1:] if line.strip())
    assert (summary["records"], summary["messages"], summary["errors"]) == ("4", "2", "2")

    consumed = ok(cli("consume", "--topic", "t", "--group", "g", "--timeout-s", "0"))
    records = json_lines(consumed.stdout)
    assert without_position(records) == GOOD
    assert [r["_position"] for r in records] == ["t:0:0", "t:0:0:1", "t:0:0:2", "t:0:1"]
    assert "4 records (2 messages)" in consumed.stderr and "acked 2" in consumed.stderr


def test_on_error_fail_stops_at_the_bad_line_with_exit_code_1(tmp_path: Path, cli: Cli) -> None:
    write_jsonl(tmp_path / "data.jsonl")
    result = cli("produce", "data.jsonl", "--topic", "t", "--on-error", "fail")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data.jsonl:3: invalid JSON" in result.stderr
    assert (
        "error: stopped at data.jsonl:3 (--on-error fail); the 2 records before it were sent" in result.stderr
    )
    records = json_lines(ok(cli("consume", "--topic", "t", "--group", "g", "--timeout-s", "0")).stdout)
    assert without_position(records) == GOOD[:2]


def test_produce_from_stdin_with_the_json_codec(cli: Cli) -> None:
    stdin = "".join(json.dumps({"i": i, "s": f"v{i}"}) + "\n" for i in range(5)) + "oops\n"
    result = ok(cli("produce", "-", "--topic", "s", "--codec", "json", stdin=stdin))
    assert "<stdin>:6: invalid JSON" in result.stderr
    records = json_lines(ok(cli("consume", "--topic", "s", "--group", "g", "--timeout-s", "0")).stdout)
    assert without_position(records) == [{"i": i, "s": f"v{i}"} for i in range(5)]


def test_produce_csv_with_a_schema_of_spread_columns(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "schema.json").write_text(
        json.dumps({"x": {"dtype": "float32", "shape": [3]}, "y": {"dtype": "int8"}})
    )
    (tmp_path / "data.csv").write_text("x0,x1,x2,y\n0.5,1,2,0\n3,4\n5,6,7,300\n8,9,ten,1\n1,2,3,1\n")
    result = ok(
        cli("produce", "data.csv", "--topic", "c", "--schema", "schema.json", "--records-per-message", "8")
    )
    assert "data.csv:3: expected 4 cells (as in the header), got 2" in result.stderr
    assert "data.csv:4: field 'y': value 300 is out of the int8 range" in result.stderr
    assert "data.csv:5: column 'x2': 'ten' is not a number" in result.stderr
    ok(cli("consume", "--topic", "c", "--group", "g", "--timeout-s", "0", "--output", "out.jsonl"))
    records = json_lines((tmp_path / "out.jsonl").read_text())
    assert without_position(records) == [{"x": [0.5, 1.0, 2.0], "y": 0}, {"x": [1.0, 2.0, 3.0], "y": 1}]


def test_produce_npy_and_npz_round_trip(tmp_path: Path, cli: Cli) -> None:
    features = np.arange(30, dtype=np.float32).reshape(10, 3) / 4
    np.save(tmp_path / "f.npy", features)
    images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2)
    np.savez(tmp_path / "d.npz", img=images, label=np.arange(5, dtype=np.int64))
    ok(cli("produce", "f.npy", "--topic", "n", "--field", "v", "--records-per-message", "4"))
    ok(cli("produce", "d.npz", "--topic", "z"))
    got = json_lines(ok(cli("consume", "--topic", "n", "--group", "g", "--timeout-s", "0")).stdout)
    np.testing.assert_array_equal(np.array([r["v"] for r in got], dtype=np.float32), features)
    got = json_lines(ok(cli("consume", "--topic", "z", "--group", "g", "--timeout-s", "0")).stdout)
    assert [r["label"] for r in got] == list(range(5))
    np.testing.assert_array_equal(np.array([r["img"] for r in got]), images)


def test_produce_with_key_keeps_a_key_on_one_partition(tmp_path: Path, cli: Cli) -> None:
    ok(cli("topics", "create", "k", "--partitions", "4"))
    (tmp_path / "k.jsonl").write_text(
        "".join(json.dumps({"user": f"u{i % 6}", "n": i}) + "\n" for i in range(60))
    )
    ok(cli("produce", "k.jsonl", "--topic", "k", "--key", "user"))
    records = json_lines(ok(cli("consume", "--topic", "k", "--group", "g", "--timeout-s", "0")).stdout)
    assert sorted(r["n"] for r in records) == list(range(60))
    partitions: dict[str, set[str]] = {}
    for r in records:
        partitions.setdefault(r["user"], set()).add(r["_position"].split(":")[1])
    assert all(len(p) == 1 for p in partitions.values()) and len(set().union(*partitions.values())) > 1
    usage = cli("produce", "k.jsonl", "--topic", "k", "--key", "user", "--records-per-message", "2")
    assert usage.returncode == 2 and "--key needs --records-per-message 1" in usage.stderr
    usage = cli("produce", "k.jsonl", "--topic", "k", "--key", "nope")
    assert usage.returncode == 2 and "'nope' is not a field" in usage.stderr


# -- consume -------------------------------------------------------------------------------------


@pytest.fixture
def ten(tmp_path: Path, cli: Cli) -> Cli:
    """Topic t: records n=0..9 in messages of 4, 4 and 2 records."""
    (tmp_path / "ten.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(10)))
    ok(cli("produce", "ten.jsonl", "--topic", "t", "--records-per-message", "4"))
    return cli


def test_consume_from_a_position_inside_a_record_batch(ten: Cli) -> None:
    records = json_lines(
        ok(ten("consume", "--topic", "t", "--group", "g", "--from", "t:0:1:2", "--timeout-s", "0")).stdout
    )
    assert [(r["n"], r["_position"]) for r in records] == [
        (6, "t:0:1:2"),
        (7, "t:0:1:3"),
        (8, "t:0:2"),
        (9, "t:0:2:1"),
    ]
    latest = ok(ten("consume", "--topic", "t", "--group", "new", "--from", "latest", "--timeout-s", "0"))
    assert latest.stdout == ""


def test_consume_max_gives_a_cut_message_back_and_commit_moves_the_group(ten: Cli) -> None:
    first = ok(ten("consume", "--topic", "t", "--group", "g", "--max", "6", "--commit", "--timeout-s", "0"))
    assert [r["n"] for r in json_lines(first.stdout)] == list(range(6))
    assert "resume with --from t:0:1:2" in first.stderr and "committed t:0:1" in first.stderr
    assert "│ g     │         0 │         1 │   2 │" in ok(ten("topics", "describe", "t")).stdout

    rest = ok(ten("consume", "--topic", "t", "--group", "g", "--commit", "--timeout-s", "0"))
    assert [r["n"] for r in json_lines(rest.stdout)] == list(range(4, 10))  # message 1 came back whole
    assert "│ g     │         0 │         3 │   0 │" in ok(ten("topics", "describe", "t")).stdout
    assert ok(ten("consume", "--topic", "t", "--group", "g", "--timeout-s", "0")).stdout == ""


def test_consume_no_ack_leaves_the_messages_to_the_group(ten: Cli) -> None:
    args = ("consume", "--topic", "t", "--group", "g", "--no-ack", "--timeout-s", "0")
    once, twice = ok(ten(*args)), ok(ten(*args))
    assert once.stdout == twice.stdout and len(json_lines(once.stdout)) == 10
    assert "not acked" in once.stderr


# -- demo and bench ------------------------------------------------------------------------------


def test_demo_trains_online_and_serves_every_version(tmp_path: Path) -> None:
    result = ok(run_infeed("demo", "--quick", cwd=tmp_path, timeout_s=240))
    summary = json.loads((tmp_path / ".infeed" / "demo" / "summary.json").read_text())
    requests = summary["requests"]
    # every request answered exactly once: no error, no timeout, no second reply
    assert requests["sent"] > 0
    assert requests["answered"] == requests["sent"]
    assert requests["errors"] == requests["timeouts"] == requests["duplicate_replies"] == 0
    assert "every request answered once" in result.stdout
    versions = summary["versions"]
    assert [v["version"] for v in versions] == [0, 15, 30, 45, 60]
    assert sum(v["requests"] for v in versions) == summary["steady"]["requests"]
    last = versions[-1]
    assert last["requests"] > 0 and last["accuracy"] > 0.3  # chance is 0.1
    assert versions[0]["requests"] == 0 or versions[0]["accuracy"] < last["accuracy"]
    final = summary["final"]
    assert final["version"] == 60 and final["requests"] == 200
    assert final["correct"] / final["requests"] > 0.5
    assert summary["steps"] == 60 and summary["produced"] == 60 * 64
    # both workers served, and left cleanly when asked
    assert len(summary["workers"]) == 2 and all(w["exit"] == 0 for w in summary["workers"])
    png = tmp_path / ".infeed" / "demo" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: .infeed/demo/demo.png" in result.stdout


def test_demo_stops_its_workers_on_ctrl_c(tmp_path: Path) -> None:
    proc = _demo_until_serving(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    logs = sorted((tmp_path / ".infeed" / "demo" / "logs").glob("worker-*.log"))
    assert len(logs) == 2
    for log, pid in zip(logs, _worker_pids(tmp_path), strict=True):
        assert "answered" in log.read_text()  # it left its loop and closed its worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _demo_until_serving(tmp_path: Path) -> subprocess.Popen[str]:
    """Start a long ``infeed demo`` and return once both workers answer requests."""
    env = {k: v for k, v in child_env().items() if not k.startswith("INFEED_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "infeed", "demo", "--quick", "--steps", "100000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "answering requests" in line:
            break
    return proc


def _worker_pids(tmp_path: Path) -> list[int]:
    logs = sorted((tmp_path / ".infeed" / "demo" / "logs").glob("worker-*.log"))
    return [int(log.read_text().split("worker pid ", 1)[1].split()[0]) for log in logs]


def test_demo_stops_everything_when_a_worker_dies(tmp_path: Path) -> None:
    proc = _demo_until_serving(tmp_path)
    try:
        pids = _worker_pids(tmp_path)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, rest
    assert "the demo failed: worker 0 exited with status -9" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(pids[1], 0)


def test_demo_round_trips_the_digits(tmp_path: Path) -> None:
    for _ in range(2):  # a second run starts from a fresh topic
        result = ok(run_infeed("demo", "--round-trip", cwd=tmp_path))
        assert "1,797 (64 float64 features + int64 label)" in result.stdout
        assert "29 sent, 29 received" in result.stdout
        assert "OK: every sample exactly once, bit-identical" in result.stdout
    described = ok(
        run_infeed(
            "--broker", "sqlite:///./.infeed/demo.db", "topics", "describe", "demo.digits", cwd=tmp_path
        )
    )
    assert (
        "29 messages" in described.stdout
        and "│ demo  │         0 │        29 │   0 │       0 │" in described.stdout
    )


def test_demo_reads_the_same_digits_as_load_digits() -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    x, y = load_digits()
    digits = sklearn_load_digits()
    assert x.dtype == np.float64 and y.dtype == np.int64 and x.shape == (1797, 64)
    np.testing.assert_array_equal(x, digits.data)
    np.testing.assert_array_equal(y, digits.target)


def test_demo_check_catches_missing_duplicated_and_altered_samples() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((6, 4)), np.arange(6, dtype=np.int64)

    def batch(ids: list[int], xs: np.ndarray[Any, Any] | None = None) -> RecordBatch:
        idx = np.array(ids, dtype=np.int64)
        return RecordBatch({"id": idx, "x": x[idx] if xs is None else xs, "y": y[idx]})

    good = RoundTripCheck(x, y)
    good.add(batch([0, 1, 2]))
    good.add(batch([3, 4, 5]))
    assert good.problems() == []

    bad = RoundTripCheck(x, y)
    bad.add(batch([0, 1, 2]))
    bad.add(batch([2, 3]))
    flipped = x[[4]].copy()
    flipped.view(np.uint64)[0, 0] ^= 1  # one bit of one float
    bad.add(batch([4], flipped))
    assert bad.problems() == [
        "field x of samples 4..4 differs from what was sent",
        "1 samples never came back",
        "1 samples came back more than once",
    ]


def test_bench_delegates_or_says_it_is_not_installed(tmp_path: Path) -> None:
    result = run_infeed("bench", "--help", cwd=tmp_path)
    if importlib.util.find_spec("infeed.bench") is None:
        assert result.returncode == 2 and "No such command" in result.stderr
    elif importlib.util.find_spec("infeed.bench.cli") is None:
        assert_one_line_error(result, 1, "benchmarks are not installed")
    else:
        assert ok(result).stdout.count("brokers") >= 1
