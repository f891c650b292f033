"""What a worker counts for its metrics: plain numbers, by machine, kept on the worker's event loop.

A worker commits thousands of transitions a second, so counting must cost next to nothing: an
increment of a dict entry, a bisect into a histogram's buckets. Nothing here knows Prometheus;
`dsm.metrics` reads these numbers when it is scraped (on its own thread: it copies, never
iterates, what the loop changes, and an increment it misses shows in the next scrape).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

from ..histogram import Histogram

TickOutcome = Literal["ok", "error", "timeout", "abandoned"]

# Upper bounds in seconds. A tick is user code (from a microsecond to minutes); a commit is one
# etcd transaction, batched with others (a millisecond or so, seconds while etcd elects a leader).
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Meter:
    """Counters by machine (and tick outcome, or instance status), gauges of ticks in flight, and
    the tick and commit histograms. The worker calls these at the points it already passes."""

    def __init__(self) -> None:
        self.transitions: defaultdict[str, int] = defaultdict(int)
        self.ticks: defaultdict[tuple[str, TickOutcome], int] = defaultdict(int)
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.claims: defaultdict[str, int] = defaultdict(int)
        self.lost: defaultdict[str, int] = defaultdict(int)  # claims found gone when their commit was sent
        self.conflicts: defaultdict[str, int] = defaultdict(int)  # commits whose compare failed
        self.started: defaultdict[str, int] = defaultdict(int)  # instances whose first commit was ours
        self.finished: defaultdict[tuple[str, str], int] = defaultdict(int)  # (machine, status)
        self.tick_seconds: dict[str, Histogram] = {}
        self.commit_seconds: dict[str, Histogram] = {}

    def tick_started(self, machine: str) -> None:
        self.in_flight[machine] += 1

    def tick_ended(self, machine: str, failure: str | None, seconds: float) -> None:
        """An attempt ended: `failure` is its error type (None: it succeeded)."""
        self.in_flight[machine] -= 1
        outcome: TickOutcome = ("ok" if failure is None else "timeout" if failure == "TimeoutError"
                                else "abandoned" if failure == "AttemptAbandoned" else "error")
        self.ticks[machine, outcome] += 1
        histogram = self.tick_seconds.get(machine)
        if histogram is None:
            histogram = self.tick_seconds[machine] = Histogram(TICK_BUCKETS)
        histogram.observe(seconds)

    def commit_answered(self, machine: str, seconds: float, applied: bool) -> None:
        """A commit's transaction was answered (applied, or its compare failed) after `seconds`."""
        histogram = self.commit_seconds.get(machine)
        if histogram is None:
            histogram = self.commit_seconds[machine] = Histogram(COMMIT_BUCKETS)
        histogram.observe(seconds)
        if not applied:
            self.conflicts[machine] += 1

    def committed(self, machine: str, transitions: int, first: bool, finished: str | None) -> None:
        """A commit applied `transitions` transitions; `first`: it was the instance's first commit
        (of its first attempt, even one that failed); `finished`: the status it ended with (None:
        it goes on)."""
        self.transitions[machine] += transitions
        if first:
            self.started[machine] += 1
        if finished is not None:
            self.finished[machine, finished] += 1
