"""What ``infeed demo`` shows: live counters, the table drawn from them, the summary and the plot.

``DemoStats`` is fed from several threads (the trainer's step callback, the client's reply thread,
the producer) and read by the display; one lock guards it. Accuracy is counted per model version
from the replies, each of which names the version that computed it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["DemoStats", "VersionStats", "plot", "render"]

#: Seconds of replies the live req/s and latency columns look back over.
WINDOW_S = 3.0


@dataclass
class VersionStats:
    """Replies computed by one model version."""

    version: int
    step: int
    loss: float
    published_at: float
    first_reply_at: float | None = None
    requests: int = 0
    correct: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        """Correct answers ÷ answers (None before the first)."""
        return self.correct / self.requests if self.requests else None


@dataclass
class _Final:
    version: int | None = None
    requests: int = 0
    correct: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)


class DemoStats:
    """Counters of one demo run; every method is thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.ended: float | None = None
        self.phase = "starting workers"
        self.produced = 0
        self.target_samples = 0
        self.step = 0
        self.trained = 0
        self.loss = math.nan
        self.losses: list[tuple[float, int, float]] = []  # (t, step, loss)
        self.versions: dict[int, VersionStats] = {}
        self.sent = 0
        self.answered = 0
        self.errors = 0
        self.timeouts = 0
        self.duplicates = 0
        self.replies: list[tuple[float, int, float]] = []  # (t, version, latency_s), steady traffic
        self._recent: deque[tuple[float, float]] = deque()  # (t, latency_s)
        self.final = _Final()
        self.workers: list[dict[str, Any]] = []  # pid and exit status of each worker process

    def now(self) -> float:
        """Seconds since the run started (until it ended)."""
        return (self.ended or time.monotonic()) - self.started

    def finish(self, phase: str) -> None:
        """Stop the clock; the run ended in ``phase``."""
        with self.lock:
            self.phase = phase
            self.ended = time.monotonic()

    def on_produced(self, n: int) -> None:
        """``n`` more samples are in the training topic."""
        with self.lock:
            self.produced += n

    def on_step(self, step: int, samples: int, loss: float) -> None:
        """The trainer finished a step."""
        with self.lock:
            self.step, self.trained, self.loss = step, samples, loss
            self.losses.append((self.now(), step, loss))

    def on_version(self, version: int, step: int, loss: float) -> None:
        """A version was published and announced."""
        with self.lock:
            self.versions.setdefault(version, VersionStats(version, step, loss, self.now()))

    def on_sent(self) -> None:
        """A request was sent."""
        with self.lock:
            self.sent += 1

    def on_reply(self, version: int, correct: bool, latency_s: float, *, final: bool) -> None:
        """A successful reply computed by ``version`` came back after ``latency_s``."""
        with self.lock:
            t = self.now()
            self.answered += 1
            if final:
                self.final.requests += 1
                self.final.correct += int(correct)
                self.final.latencies_s.append(latency_s)
                return
            v = self.versions.setdefault(version, VersionStats(version, version, math.nan, t))
            if v.first_reply_at is None:
                v.first_reply_at = t
            v.requests += 1
            v.correct += int(correct)
            v.latencies_s.append(latency_s)
            self.replies.append((t, version, latency_s))
            self._recent.append((t, latency_s))

    def on_failure(self, *, timeout: bool) -> None:
        """A request ended with an error reply, or with no reply in time (``timeout``)."""
        with self.lock:
            if timeout:
                self.timeouts += 1
            else:
                self.answered += 1
                self.errors += 1

    def window(self) -> tuple[float, float | None, float | None]:
        """Return (replies/s, p50 s, p99 s) over the last ``WINDOW_S`` seconds."""
        with self.lock:
            t = self.now()
            while self._recent and self._recent[0][0] < t - WINDOW_S:
                self._recent.popleft()
            lat = [latency for _, latency in self._recent]
        span = min(WINDOW_S, max(t, 1e-9))
        if not lat:
            return 0.0, None, None
        p50, p99 = np.percentile(lat, [50, 99])
        return len(lat) / span, float(p50), float(p99)

    def overall(self) -> tuple[float, float | None, float | None]:
        """Return (replies/s, p50 s, p99 s) of the steady traffic over the whole run."""
        with self.lock:
            t = [r[0] for r in self.replies]
            lat = [r[2] for r in self.replies]
        if len(lat) < 2:
            return 0.0, None, None
        p50, p99 = np.percentile(lat, [50, 99])
        return len(lat) / max(t[-1] - t[0], 1e-9), float(p50), float(p99)

    def serving_version(self) -> int | None:
        """The newest version that has answered a request."""
        with self.lock:
            served = [v.version for v in self.versions.values() if v.requests]
        return max(served) if served else None

    def to_json(self) -> dict[str, Any]:
        """Return the run's outcome as JSON-safe data."""
        with self.lock:
            steady = [latency for _, _, latency in self.replies]
            versions = [
                {
                    "version": v.version,
                    "step": v.step,
                    "train_loss": None if math.isnan(v.loss) else v.loss,
                    "requests": v.requests,
                    "correct": v.correct,
                    "accuracy": v.accuracy,
                    "p50_ms": _ms(v.latencies_s, 50),
                    "p99_ms": _ms(v.latencies_s, 99),
                }
                for v in sorted(self.versions.values(), key=lambda v: v.version)
            ]
            f = self.final
            return {
                "seconds": round(self.now(), 2),
                "produced": self.produced,
                "steps": self.step,
                "trained": self.trained,
                "last_loss": None if math.isnan(self.loss) else self.loss,
                "versions": versions,
                "requests": {
                    "sent": self.sent,
                    "answered": self.answered,
                    "errors": self.errors,
                    "timeouts": self.timeouts,
                    "duplicate_replies": self.duplicates,
                },
                "workers": list(self.workers),
                "steady": {
                    "requests": len(steady),
                    "p50_ms": _ms(steady, 50),
                    "p99_ms": _ms(steady, 99),
                },
                "final": {
                    "version": f.version,
                    "requests": f.requests,
                    "correct": f.correct,
                    "accuracy": f.correct / f.requests if f.requests else None,
                    "seconds": f.seconds,
                    "requests_per_s": f.requests / f.seconds if f.seconds > 0 else None,
                    "p50_ms": _ms(f.latencies_s, 50),
                    "p99_ms": _ms(f.latencies_s, 99),
                },
            }


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 3) if values else None


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def render(stats: DemoStats, title: str, *, overall: bool = False) -> RenderableType:
    """Return the live view: training and serving counters, then one row per model version.

    Args:
        stats: the run's counters.
        title: the view's title.
        overall: show rate and latency over the whole steady traffic, not the last seconds.
    """
    from rich.console import Group
    from rich.table import Table

    rps, p50, p99 = stats.overall() if overall else stats.window()
    with stats.lock:
        top = Table(title=title, show_header=False, min_width=60, title_justify="left")
        top.add_column(style="bold")
        top.add_column(justify="right")
        top.add_column(style="bold")
        top.add_column(justify="right")
        loss = "-" if math.isnan(stats.loss) else f"{stats.loss:.3f}"
        top.add_row("phase", stats.phase, "elapsed", f"{stats.now():.1f} s")
        top.add_row("produced", f"{stats.produced:,}/{stats.target_samples:,}", "step", f"{stats.step:,}")
        top.add_row("trained", f"{stats.trained:,} samples", "loss", loss)
        top.add_row("requests", f"{stats.sent:,} sent", "answered", f"{stats.answered:,}")
        top.add_row("throughput", f"{rps:,.0f} req/s", "p50 / p99", f"{_fmt_ms(p50)} / {_fmt_ms(p99)} ms")
        top.add_row("versions", f"{len(stats.versions)} published", "dup. replies", f"{stats.duplicates:,}")
        top.add_row("errors", f"{stats.errors:,}", "timeouts", f"{stats.timeouts:,}")
        per = Table(min_width=60)
        for name in ("version", "step", "train loss", "requests", "accuracy", "p50 ms", "p99 ms"):
            per.add_column(name, justify="right")
        for v in sorted(stats.versions.values(), key=lambda v: v.version):
            acc = v.accuracy
            per.add_row(
                str(v.version),
                f"{v.step:,}",
                "-" if math.isnan(v.loss) else f"{v.loss:.3f}",
                f"{v.requests:,}",
                "-" if acc is None else f"{acc:.1%}",
                "-" if not v.latencies_s else f"{np.percentile(v.latencies_s, 50) * 1000:.1f}",
                "-" if not v.latencies_s else f"{np.percentile(v.latencies_s, 99) * 1000:.1f}",
            )
    return Group(top, per)


def plot(stats: DemoStats, path: Path) -> Path:
    """Draw accuracy per version, the training loss and the serving rate and latency into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    data = stats.to_json()
    with stats.lock:
        losses = list(stats.losses)
        replies = list(stats.replies)
        swaps = [(v.first_reply_at, v.version) for v in stats.versions.values() if v.first_reply_at]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (acc_ax, loss_ax, serve_ax) = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    try:
        rows = [v for v in data["versions"] if v["accuracy"] is not None]
        acc_ax.plot([v["step"] for v in rows], [v["accuracy"] for v in rows], "o-", label="live requests")
        final = data["final"]
        if final["accuracy"] is not None:
            step = next((v["step"] for v in data["versions"] if v["version"] == final["version"]), 0)
            acc_ax.plot([step], [final["accuracy"]], "s", color="tab:green", label="whole held-out set")
        acc_ax.axhline(0.1, color="gray", linestyle="--", linewidth=1, label="chance (10%)")
        acc_ax.set(title="held-out accuracy per model version", xlabel="version (training step)")
        acc_ax.set_ylim(0, 1.02)
        acc_ax.legend(fontsize="small", loc="lower right")
        if losses:
            loss_ax.plot([s for _, s, _ in losses], [x for _, _, x in losses], linewidth=1)
        for v in data["versions"]:
            loss_ax.axvline(v["step"], color="gray", linewidth=0.6, linestyle=":")
        loss_ax.set(title="training loss (dotted: versions published)", xlabel="step", ylabel="loss")
        if replies:
            t = np.array([r[0] for r in replies])
            lat = np.array([r[2] for r in replies]) * 1000
            edges = np.arange(t.min(), t.max() + 1.0, 1.0)  # whole seconds from the first reply
            counts, _ = np.histogram(t, edges)
            serve_ax.step(edges[:-1], counts, where="post", color="tab:blue", label="req/s")
            serve_ax.set(title="serving: throughput and latency", xlabel="seconds", ylabel="replies/s")
            serve_ax.set_ylim(bottom=0)
            lat_ax = serve_ax.twinx()
            bins = np.digitize(t, edges) - 1
            mids, p50, p99 = [], [], []
            for b in range(len(edges) - 1):
                sel = lat[bins == b]
                if len(sel):
                    mids.append(edges[b] + 0.5)
                    p50.append(np.percentile(sel, 50))
                    p99.append(np.percentile(sel, 99))
            lat_ax.plot(mids, p50, color="tab:orange", label="p50 ms")
            lat_ax.plot(mids, p99, color="tab:red", label="p99 ms")
            lat_ax.set_ylabel("latency ms")
            lat_ax.set_ylim(bottom=0)
            lat_ax.legend(fontsize="small", loc="upper right")
            for at, version in swaps:
                serve_ax.axvline(at, color="gray", linewidth=0.6, linestyle=":")
                serve_ax.text(at, 0, f" v{version}", fontsize=7, rotation=90, va="bottom")
            serve_ax.legend(fontsize="small", loc="upper left")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
