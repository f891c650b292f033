"""Tick handlers for the benchmark machines: they measure the engine, not the work.

BENCH_TICK_SECONDS (default 0) makes every tick sleep, for benchmarks that need workers to be
holding claims when something happens to them.
"""

import os
import time

_SLEEP = float(os.environ.get("BENCH_TICK_SECONDS", "0") or 0)


def noop(payload, ctx):
    if _SLEEP:
        time.sleep(_SLEEP)
    return None


def count(payload, ctx):
    payload["n"] = payload.get("n", 0) + 1
    return None
