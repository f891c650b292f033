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


_MAP_LOG = os.environ.get("BENCH_MAP_LOG")
_map_fd: list[int] = []


def mapped(payload, ctx):
    """A map item's tick: the payload ({item, index}) is its result. With BENCH_MAP_LOG set, each
    invocation appends when it began and ended (monotonic clock, shared by every process of the
    machine), from which bench/map.py counts how many items ran at once."""
    if not _MAP_LOG:
        return None
    if not _map_fd:
        _map_fd.append(os.open(_MAP_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    began = time.monotonic()
    if _SLEEP:
        time.sleep(_SLEEP)
    os.write(_map_fd[0], f"{began} {time.monotonic()}\n".encode())
    return None
