"""The ``infeed`` command: a typer app with a global ``--broker``; user errors end as one red line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from infeed.cli import consume, demo, produce, topics
from infeed.cli._shared import BrokerOption, CliState, fail

__all__ = ["app", "main"]

app = typer.Typer(
    name="infeed",
    help="infeed: message queues put to work for ML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from infeed import __version__

        typer.echo(f"infeed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    broker: BrokerOption = None,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Infeed: message queues put to work for ML.

    Broker URL precedence: --broker, then $INFEED_BROKER, then [infeed] broker in ./infeed.toml
    (or the file $INFEED_CONFIG names), then sqlite:///./.infeed/infeed.db.
    """
    ctx.obj = CliState(broker)


app.add_typer(topics.app, name="topics")
app.command("produce")(produce.produce)
app.command("consume")(consume.consume)
app.command("demo")(demo.demo)
app.command("bridge")(importlib.import_module("infeed.cli.bridge").bridge)
app.command("train")(importlib.import_module("infeed.cli.train").train)
app.command("serve")(importlib.import_module("infeed.cli.serve").serve)
app.command("predict")(importlib.import_module("infeed.cli.serve").predict)
app.command("score")(importlib.import_module("infeed.cli.score").score)
app.add_typer(importlib.import_module("infeed.cli.datasets").app, name="datasets")


def _bench(ctx: typer.Context) -> None:
    """Run the benchmarks: infeed bench brokers|all ... (see infeed bench --help)."""
    try:
        module = importlib.import_module("infeed.bench.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("infeed.bench", "infeed.bench.cli"):
            raise fail(f"the benchmarks cannot start: {exc}") from exc
        raise fail("benchmarks are not installed (no module infeed.bench.cli)") from exc
    bench_app = module.app
    command = typer.main.get_command(bench_app) if isinstance(bench_app, typer.Typer) else bench_app
    command.main(args=list(ctx.args), prog_name="infeed bench")


# Only where the bench package is present; the spec lookup imports nothing of it.
if importlib.util.find_spec("infeed.bench") is not None:
    app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )(_bench)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``infeed`` command line (the console entry point).

    infeed's errors, ValueError and OSError (a missing file) become one red line on stderr and exit
    code 1; a ConfigError (bad URL, setting or missing extra) exits 2, like a usage error.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    from infeed.errors import ConfigError, InfeedError

    command = typer.main.get_command(app)
    try:
        command.main(args=None if argv is None else list(argv), prog_name="infeed")
    except ConfigError as exc:
        _fail_with(exc, 2)
    except (InfeedError, ValueError, OSError) as exc:
        _fail_with(exc, 1)


def _fail_with(exc: BaseException, code: int) -> None:
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        message = str(exc) or type(exc).__name__
    fail(message)
    sys.exit(code)
