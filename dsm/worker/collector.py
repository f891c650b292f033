"""The garbage collector of a worker process, paced for what a worker allocates.

A worker makes a few hundred container objects a transition (records, tokens, history entries,
futures, gRPC messages and their answers), nearly all gone by the end of it. CPython's default
pacing runs a young collection every 700 net allocations of them and an old one every 100 of
those: in one worker on the linear machine that was 0.30 s of its 5.7 s of CPU (5%, about 14 µs a
transition; `gc.callbacks` timed it). A young collection every 10,000 finds most of a transition's
objects already freed by reference counting, and the objects of start-up (modules, definitions)
are frozen out of every collection: 0.02 s in the same run. Garbage that is a cycle waits longer
to be collected, which costs a process of tens of megabytes nothing it would notice.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)  # gc.set_threshold: young collections, and how often each older one


def pace_collector() -> None:
    """Pace the collector of this process for a worker (`dsm worker`, once it has started up).
    Not for a process that embeds a worker in an application: the collector is the process's."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
