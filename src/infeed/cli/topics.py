"""``infeed topics``: list, describe, create and delete topics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from infeed.cli._shared import BrokerOption, out, plural, state

if TYPE_CHECKING:
    from infeed.types import GroupInfo

__all__ = ["app"]

app = typer.Typer(
    help="List, describe, create and delete topics.", no_args_is_help=True, rich_markup_mode="markdown"
)

TopicArg = Annotated[str, typer.Argument(metavar="TOPIC", help="The topic name.")]


@app.command("list")
def list_topics(ctx: typer.Context, broker: BrokerOption = None) -> None:
    """List topics with their partitions, depth and consumer groups (with lag)."""
    from rich.table import Table

    from infeed.brokers import connect
    from infeed.errors import TopicNotFoundError

    settings = state(ctx).settings(broker)
    with connect(settings.broker) as b:
        infos = []
        for name in b.list_topics():
            try:
                infos.append(b.describe_topic(name))
            except TopicNotFoundError:  # deleted since list_topics
                continue
    console = out()
    if not infos:
        console.print(f"no topics on {settings.broker}", markup=False)
        return
    console.print(f"topics on {settings.broker}", markup=False)
    table = Table()
    table.add_column("topic", overflow="fold")
    table.add_column("partitions", justify="right")
    table.add_column("depth", justify="right")
    table.add_column("groups (lag)", overflow="fold")
    for info in infos:
        groups = ", ".join(f"{g.name} ({g.total_lag:,})" for g in info.groups) or "-"
        table.add_row(info.name, str(len(info.partitions)), f"{info.depth:,}", groups)
    console.print(table)


@app.command("describe")
def describe(ctx: typer.Context, topic: TopicArg, broker: BrokerOption = None) -> None:
    """Show each partition's offsets and depth, and each group's committed offset, lag and pending."""
    from rich.table import Table

    with state(ctx).connect(broker) as b:
        info = b.describe_topic(topic)
    console = out()
    console.print(
        f"topic {topic}: {plural(len(info.partitions), 'partition')}, {plural(info.depth, 'message')}"
    )
    parts = Table()
    for name in ("partition", "low", "high", "depth"):
        parts.add_column(name, justify="right")
    for p in info.partitions:
        parts.add_row(str(p.partition), f"{p.low:,}", f"{p.high:,}", f"{p.depth:,}")
    console.print(parts)
    if not info.groups:
        console.print("no consumer groups")
        return
    console.print("consumer groups")
    groups = Table()
    groups.add_column("group", overflow="fold")
    for name in ("partition", "committed", "lag", "pending"):
        groups.add_column(name, justify="right")
    for g in info.groups:
        for i, p in enumerate(info.partitions):
            committed = g.committed.get(p.partition)
            groups.add_row(
                g.name if i == 0 else "",
                str(p.partition),
                "-" if committed is None else f"{committed:,}",
                f"{g.lag.get(p.partition, 0):,}",
                _pending(g) if i == 0 else "",
            )
    console.print(groups)


def _pending(group: GroupInfo) -> str:
    return "?" if group.pending < 0 else f"{group.pending:,}"


@app.command("create")
def create(
    ctx: typer.Context,
    topic: TopicArg,
    partitions: Annotated[int, typer.Option("--partitions", "-p", min=1, help="Number of partitions.")] = 1,
    broker: BrokerOption = None,
) -> None:
    """Create a topic (nothing happens if it exists with the same partitions)."""
    with state(ctx).connect(broker) as b:
        existed = topic in b.list_topics()
        b.create_topic(topic, partitions=partitions)
    verb = "exists" if existed else "created"
    out().print(f"topic {topic} {verb} with {plural(partitions, 'partition')}", markup=False)


@app.command("delete")
def delete(
    ctx: typer.Context,
    topic: TopicArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    broker: BrokerOption = None,
) -> None:
    """Delete a topic with its messages and consumer groups."""
    with state(ctx).connect(broker) as b:
        info = b.describe_topic(topic)
        if not yes:
            typer.confirm(
                f"Delete topic {topic} with {info.depth:,} messages and {len(info.groups)} groups?",
                abort=True,
            )
        b.delete_topic(topic)
    out().print(f"deleted topic {topic}", markup=False)
