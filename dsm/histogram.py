"""A histogram in plain numbers, for counters kept on an event loop (`dsm.worker.meter`, the
housekeeper's schedules) and read by `dsm.metrics` when it is scraped."""

from __future__ import annotations

from bisect import bisect_left


class Histogram:
    """Observations counted into buckets (`counts[i]`: those in (bounds[i-1], bounds[i]]; the last
    entry: those above every bound) and summed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
