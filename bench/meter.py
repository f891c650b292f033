"""What counting for the metrics costs a worker per transition (`dsm.worker.meter`).

    python bench/meter.py

A worker counts, for each transition of a linear machine, a tick started and ended (with its
histogram), a commit answered (its latency histogram) and applied, and a claim. This times
exactly those calls, in CPU time, so that the figure holds on a busy machine too; the
throughput with and without them is measured by `bench/run.py throughput` (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsm.worker.meter import Meter  # noqa: E402


def per_transition(rounds: int = 200_000) -> float:
    """Seconds of CPU the counting of one transition takes (median of five runs)."""
    runs = []
    for _ in range(5):
        meter = Meter()
        started = time.process_time()
        for _ in range(rounds):
            meter.tick_started("order")
            meter.tick_ended("order", None, 0.0012)
            meter.commit_answered("order", 0.003, True)
            meter.committed("order", 1, False, None)
            meter.claims["order"] += 1
        runs.append((time.process_time() - started) / rounds)
    return sorted(runs)[2]


if __name__ == "__main__":
    cost = per_transition()
    print(f"{cost * 1e6:.2f} us of CPU per transition; at 5,000 transitions/s: {cost * 5000 * 100:.2f}% of a core")
