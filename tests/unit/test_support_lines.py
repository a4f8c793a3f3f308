"""Lines a child process writes for its parent to read: one write each, so a SIGKILL cannot split one.

A process killed between the two writes ``print`` makes ("step 5", then "\\n") leaves half a line in
the pipe, and the next line written there is glued onto it: ``step 5exit 1234 -9``. The crash tests
write with ``say`` and read a packet-mode pipe that refuses any write that is not one whole line.
"""

from __future__ import annotations

import os
import select
import signal

import pytest

from tests.support import line_pipe, read_lines, say, spawn_python


def _lines_of(code: str) -> list[str]:
    """Run ``python -c CODE`` with stdout on a packet-mode pipe and read its lines."""
    read_fd, write_fd = line_pipe()
    try:
        child = spawn_python("-c", code, stdout=write_fd, stderr=None)
    finally:
        os.close(write_fd)
    try:
        return list(read_lines(read_fd))
    finally:
        child.wait(timeout=60)


def test_say_writes_each_line_whole_in_one_write() -> None:
    code = "from tests.support import say\nfor n in range(20):\n    say(f'step {n}')"
    assert _lines_of(code) == [f"step {n}" for n in range(20)]


def test_a_line_written_in_two_writes_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"not one whole line: b'step 5'"):
        _lines_of("print('step 5')")


def test_a_sigkilled_writer_leaves_only_whole_lines() -> None:
    """Kill a writer that says lines as fast as it can, many times: no write is ever cut."""
    for _ in range(5):
        read_fd, write_fd = line_pipe()
        try:
            child = spawn_python(
                "-c",
                "from tests.support import say\nn = 0\nwhile True:\n    n += 1\n    say(f'step {n}')",
                stdout=write_fd,
                stderr=None,
            )
        finally:
            os.close(write_fd)
        lines = read_lines(read_fd)
        seen = [next(lines) for _ in range(50)]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        seen += list(lines)  # what it wrote up to the kill: whole lines, or read_lines raises
        assert seen == [f"step {n}" for n in range(1, len(seen) + 1)]


@pytest.mark.parametrize("line", ["two\nlines", "x" * select.PIPE_BUF])
def test_say_refuses_what_is_not_one_short_line(line: str) -> None:
    with pytest.raises(ValueError, match="not one line of at most"):
        say(line)
