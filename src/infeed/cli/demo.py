"""``infeed demo``: train online from a stream and serve the versions hot-reloaded, on the embedded broker.

scikit-learn's bundled digits (1,797 8x8 images; they ship inside the package, nothing is
downloaded) are split: a held-out set for evaluation, the rest streamed into a topic as record
batches. The ``Trainer`` learns from the stream and publishes a model version every few steps;
two inference worker processes load each version as it is announced and swap it in between
batches; a client sends held-out samples at a steady rate. A live table shows accuracy per model
version (every reply names the version that computed it), requests/s, p50/p99 latency, the
training step and loss. At the end the whole held-out set goes to the last version at once, and a
summary, ``summary.json`` and a plot are written under ``.infeed/demo/``.

``infeed demo --round-trip`` instead round-trips the digits through a topic and checks that every
sample came back exactly once, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from infeed.cli._shared import BrokerOption, err, fail, out, state

if TYPE_CHECKING:
    from rich.console import Console

    from infeed.cli._demo_view import DemoStats

__all__ = ["DEMO_BROKER_URL", "DEMO_DIR", "demo"]

#: Where the demo writes unless --broker names another broker (deleted and made afresh each run).
DEMO_BROKER_URL = "sqlite:///./.infeed/demo.db"
#: The demo's files: model registry, checkpoints, worker logs, summary.json, demo.png.
DEMO_DIR = Path(".infeed/demo")
#: Redraws of the live view per second, at most.
_REDRAWS_PER_S = 4.0


def demo(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, faster run.")] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps of 64 samples.")] = None,
    rate: Annotated[float | None, typer.Option(min=1.0, help="Steady requests per second.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Inference worker processes.")] = 2,
    round_trip: Annotated[
        bool, typer.Option("--round-trip", help="Only round-trip the digits through a topic and check them.")
    ] = False,
    records_per_message: Annotated[int, typer.Option(min=1, help="Samples per message (--round-trip).")] = 64,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the topic (--round-trip).")] = 1,
    broker: BrokerOption = None,
) -> None:
    """Train on a stream of digits and serve each new model version live; print and plot the outcome.

    Writes to sqlite:///./.infeed/demo.db (a fresh file each run) unless --broker is given
    (INFEED_BROKER and infeed.toml are not used, so the demo never writes into a configured
    broker). Needs the demo extra: pip install 'infeed[demo]'.
    """
    url = broker or state(ctx).broker or DEMO_BROKER_URL
    if round_trip:
        from infeed.cli._roundtrip import round_trip as run_round_trip

        run_round_trip(url, records_per_message=records_per_message, partitions=partitions)
        return
    from dataclasses import replace

    from infeed.cli._demo_run import DemoConfig, DemoError, fresh_sqlite, run
    from infeed.cli._demo_view import DemoStats, plot

    config = DemoConfig.quick() if quick else DemoConfig()
    config = replace(
        config,
        workers=workers,
        steps=steps or config.steps,
        requests_per_s=rate or config.requests_per_s,
    )
    if url == DEMO_BROKER_URL:
        fresh_sqlite(Path(".infeed/demo.db"))
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    stats = DemoStats()
    view = _View(err(), stats, f"infeed demo: {url}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with view:
            run(url, DEMO_DIR.resolve(), config, stats, view.tick)
    except KeyboardInterrupt:
        raise fail("interrupted: the trainer, the client and the workers were stopped", code=130) from None
    except DemoError as exc:
        raise fail(f"the demo failed: {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = stats.to_json()
    (DEMO_DIR / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    png = plot(stats, DEMO_DIR / "demo.png")
    _print_summary(out(), url, summary, stats, png)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _View:
    """The live table on a terminal; elsewhere a line per version and one every few seconds."""

    def __init__(self, console: Console, stats: DemoStats, title: str) -> None:
        self.console, self.stats, self.title = console, stats, title
        self.live: Any = None
        self.drawn = 0.0
        self.said_at = 0.0
        self.told: set[tuple[str, int]] = set()

    def __enter__(self) -> _View:
        if self.console.is_terminal:
            from rich.live import Live

            from infeed.cli._demo_view import render

            self.live = Live(render(self.stats, self.title), console=self.console, auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.tick(force=True)
            self.live.__exit__(None, None, None)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn < 1.0 / _REDRAWS_PER_S:
            return
        self.drawn = now
        if self.live is not None:
            from infeed.cli._demo_view import render

            self.live.update(render(self.stats, self.title), refresh=True)
            return
        self._lines(now)

    def _lines(self, now: float) -> None:
        s = self.stats
        with s.lock:
            events = [("published", v.version, v.step, v.loss) for v in s.versions.values()]
            events += [("answering", v.version, v.step, v.loss) for v in s.versions.values() if v.requests]
        for kind, version, step, loss in sorted(events, key=lambda e: (e[1], e[0] != "published")):
            if (kind, version) in self.told:
                continue
            self.told.add((kind, version))
            if kind == "published":
                trained = "untrained" if step == 0 else f"step {step}, loss {loss:.3f}"
                self.console.print(f"version {version} published ({trained})")
            else:
                self.console.print(f"version {version} answering requests")
        if now - self.said_at >= 5.0:
            self.said_at = now
            rps, p50, p99 = s.window()
            lat = (
                f", p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
                if p50 is not None and p99 is not None
                else ""
            )
            self.console.print(
                f"[{s.now():5.1f} s] {s.phase}: step {s.step}, {s.sent:,} requests sent, "
                f"{s.answered:,} answered, {rps:,.0f} req/s{lat}",
                markup=False,
                soft_wrap=True,
            )


def _print_summary(console: Console, url: str, summary: dict[str, Any], stats: DemoStats, png: Path) -> None:
    from infeed.cli._demo_view import render

    console.print(render(stats, f"infeed demo: {url}", overall=True))
    req = summary["requests"]
    final = summary["final"]
    unanswered = req["sent"] - req["answered"]
    every = unanswered == 0 and req["timeouts"] == 0 and req["duplicate_replies"] == 0
    console.print(
        f"requests: {req['sent']:,} sent, {req['answered']:,} answered ({req['errors']} errors), "
        f"{req['timeouts']} timed out, {req['duplicate_replies']} duplicate replies"
        + (" - every request answered once" if every else ""),
        markup=False,
        soft_wrap=True,
    )
    steady = summary["steady"]
    console.print(
        f"steady traffic: {steady['requests']:,} requests, "
        f"p50 {steady['p50_ms']} ms, p99 {steady['p99_ms']} ms",
        markup=False,
        soft_wrap=True,
    )
    if final["accuracy"] is not None:
        console.print(
            f"last version {final['version']} on the whole held-out set "
            f"({final['requests']} requests at once): "
            f"accuracy {final['accuracy']:.1%}, {final['requests_per_s']:,.0f} req/s, "
            f"p50 {final['p50_ms']} ms, p99 {final['p99_ms']} ms",
            markup=False,
            soft_wrap=True,
        )
    versions = summary["versions"]
    console.print(
        f"{len(versions)} versions published over {summary['steps']} steps "
        f"({summary['trained']:,} samples, last loss {summary['last_loss'] or math.nan:.3f}) "
        f"in {summary['seconds']:.1f} s",
        markup=False,
        soft_wrap=True,
    )
    console.print(f"summary: {DEMO_DIR / 'summary.json'}", markup=False, soft_wrap=True)
    console.print(f"plot: {png}", markup=False, soft_wrap=True)
