"""``infeed bridge``: forward MQTT topic filters into an infeed topic until Ctrl-C or a limit."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from infeed.cli._shared import BrokerOption, err, out, plural, rate, state

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from infeed.bridge.mqtt import BridgeStats, MqttBridge

__all__ = ["REPORT_EVERY_S", "bridge"]

#: Seconds between progress lines when stderr is not a terminal (logs, pipes); none while idle.
REPORT_EVERY_S = 10.0


def bridge(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="MQTT_URL",
            help="mqtt://HOST:PORT/FILTER?OPTIONS, e.g. 'mqtt://127.0.0.1:1883/sensors/+/temp?max_batch=200'.",
        ),
    ],
    to: Annotated[str, typer.Option("--to", "-t", metavar="TOPIC", help="infeed topic to write to.")],
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            "-f",
            metavar="FILTER",
            help="Another MQTT topic filter (repeatable), e.g. 'sensors/#'.",
        ),
    ] = None,
    max_messages: Annotated[
        int | None, typer.Option("--max-messages", min=1, help="Stop after forwarding this many messages.")
    ] = None,
    duration_s: Annotated[
        float | None,
        typer.Option("--duration-s", min=0, help="Stop after this many seconds.  [default: run]"),
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Forward MQTT messages into an infeed topic, at least once.

    Subscribes at QoS 1 and acknowledges each message to the MQTT broker only after the infeed
    broker holds it, so a crash loses nothing: the MQTT broker sends it again to the next run
    (some messages then arrive twice). The payload is forwarded unchanged; headers mqtt-topic,
    mqtt-qos and mqtt-retain describe it, and the MQTT topic is the partitioning key, so each
    sensor's messages stay in order in one partition.

    OPTIONS (URL query): qos=1|0, protocol=5|3.1.1, client_id (default infeed-bridge-TOPIC; one per
    bridge), clean_start, session_expiry_s, receive_maximum, max_batch, max_wait_s, keepalive_s,
    connect_timeout_s, retained=new|all|skip, key=topic|none. Write '#' as is or as %23.
    See docs/mqtt.md for what MQTT can and cannot guarantee.
    """
    try:
        from infeed.bridge.mqtt import MqttBridge, MqttBridgeConfig
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "paho":
            raise
        from infeed.errors import ConfigError

        raise ConfigError("infeed bridge needs the paho-mqtt library: pip install 'infeed[mqtt]'") from exc

    config = MqttBridgeConfig.from_url(source, filters=filters or ())
    console = err()
    with state(ctx).connect(broker) as broker_, _stop_on_sigterm() as terminated:
        bridge_ = MqttBridge(config, broker_, to)
        bridge_.start(max_messages=max_messages)
        where = f"mqtt://{config.host}:{config.port}"
        console.print(
            f"bridging {where} {', '.join(config.filters)} (QoS {config.qos}, client id "
            f"{bridge_.client_id}) -> topic {to}; Ctrl-C stops",
            soft_wrap=True,
            markup=False,
        )
        started = time.monotonic()

        def until(_stats: BridgeStats) -> bool:
            return terminated.is_set() or (
                duration_s is not None and time.monotonic() - started >= duration_s
            )

        interrupted = False
        with _progress(console, f"{where} -> {to}") as on_tick:
            try:
                stats = bridge_.run(until, on_tick=on_tick)
            except KeyboardInterrupt:
                interrupted = True
                stats = bridge_.stop()  # a no-op unless Ctrl-C came before run() could stop
    _summary(
        out(),
        bridge_,
        stats,
        stopped_by="Ctrl-C" if interrupted else "SIGTERM" if terminated.is_set() else None,
    )


@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """SIGTERM (systemd, Kubernetes) stops the bridge like Ctrl-C: forward, acknowledge, disconnect."""
    terminated = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: terminated.set())
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress(console: Console, description: str) -> Iterator[Callable[[BridgeStats], None]]:
    """A live msgs/s line on a terminal; elsewhere a plain line every ``REPORT_EVERY_S``."""
    if not console.is_terminal:
        last = [time.monotonic(), 0]

        def report(stats: BridgeStats) -> None:
            now = time.monotonic()
            if now - last[0] >= REPORT_EVERY_S and stats.forwarded != last[1]:  # quiet when idle
                recent = rate(stats.forwarded - last[1], now - last[0])
                console.print(f"forwarded {stats.forwarded:,} ({recent} msgs/s)", markup=False)
                last[:] = [now, stats.forwarded]

        yield report
        return
    progress = _live(console)
    with progress:
        task = progress.add_task(description, total=None)
        yield lambda stats: progress.update(task, completed=stats.forwarded)


def _live(console: Console) -> Progress:
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} msgs/s", style="progress.data.speed")

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,.0f} msgs"),
        Rate(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _summary(console: Console, bridge_: MqttBridge, stats: BridgeStats, *, stopped_by: str | None) -> None:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("forwarded", f"{stats.forwarded:,}")
    table.add_row("batches", f"{stats.batches:,}")
    table.add_row("redelivered (MQTT DUP flag)", f"{stats.redelivered:,}")
    table.add_row("dead-lettered (too large)", f"{stats.dead_lettered:,}")
    table.add_row("ignored", f"{stats.ignored:,}")
    table.add_row("reconnects", f"{stats.reconnects:,}")
    if stats.sessions_lost:
        table.add_row("[red]sessions lost[/]", f"{stats.sessions_lost:,}")
    table.add_row("seconds", f"{stats.seconds:.2f}")
    table.add_row("rate", f"{rate(stats.forwarded, stats.seconds)} msgs/s")
    note = f" (stopped by {stopped_by})" if stopped_by else ""
    console.print(f"bridged {plural(stats.forwarded, 'message')} to topic [bold]{bridge_.topic}[/]{note}")
    console.print(table)
