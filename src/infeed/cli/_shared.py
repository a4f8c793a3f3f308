"""What every command shares: the resolved ``--broker``, the two consoles, and number formatting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from infeed.brokers import Broker
    from infeed.config import Settings

#: The ``--broker`` option, accepted before the command (``infeed --broker URL topics list``) and after it.
BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        "-b",
        metavar="URL",
        help="Broker URL (over $INFEED_BROKER and infeed.toml), e.g. sqlite:///q.db, redis://127.0.0.1:6379.",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class CliState:
    """What the top-level callback parsed, handed to commands through ``ctx.obj``."""

    broker: str | None = None

    def settings(self, broker: str | None = None) -> Settings:
        """Resolve settings: ``broker`` (a command's own flag) > the global flag > env > infeed.toml."""
        from infeed.config import Settings

        return Settings.load({"broker": broker or self.broker})

    def connect(self, broker: str | None = None) -> Broker:
        """Open the broker the flags, ``INFEED_BROKER`` or ``infeed.toml`` name."""
        from infeed.brokers import connect

        return connect(self.settings(broker).broker)


def state(ctx: typer.Context) -> CliState:
    """Return the :class:`CliState` the top-level callback stored (a blank one when run alone)."""
    found = ctx.find_object(CliState)
    return found if found is not None else CliState()


def out() -> Console:
    """Return a console on stdout for reports and tables."""
    from rich.console import Console

    return Console(highlight=False)


def err() -> Console:
    """Return a console on stderr for progress, warnings and errors."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fail(message: str, *, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on one line of stderr; return the ``Exit`` to raise."""
    from rich.markup import escape

    err().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def human_bytes(n: float) -> str:
    """Format a byte count: ``1.2 MB``."""
    value, unit = float(n), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def rate(count: float, seconds: float) -> str:
    """Format ``count / seconds`` with thousands separators (``-`` when no time passed)."""
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


def records_progress(console: Console) -> Progress:
    """Return a rich progress display of records: a bar, the count, records/s and elapsed time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} records/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no bar frames in logs and pipes
    )


def plural(n: int, noun: str) -> str:
    """Return ``"1 message"``, ``"2 messages"`` (with thousands separators)."""
    return f"{n:,} {noun}{'s' * (n != 1)}"
