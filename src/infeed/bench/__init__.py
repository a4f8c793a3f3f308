"""``infeed bench``: the measurements of BENCHMARKS.md, as ratios taken side by side in one run.

``infeed.bench.harness`` holds what every figure shares (timing, min/median/max, machine facts,
the JSON, the table, the plot); ``infeed.bench.payloads`` the reference workloads;
``infeed.bench.brokers`` figure 1 (broker overhead) with the raw-client baselines of
``infeed.bench.baselines``. Results go to ``bench/results/<figure>.json`` and ``.png``.
"""

from __future__ import annotations

__all__: list[str] = []
