"""Compile time of large machines: is checking a definition linear in its states?

    python bench/compile.py              # chains of 1k, 2k, 5k and 9k states, wide forks, nested forks
    python bench/compile.py 1000 20000   # chains of the sizes given

Prints seconds per compile (best of three) and microseconds per state: a flat last column is
linear. Nested forks cost states x depth (every state records the branches around it), so their
column grows with the depth. The state limit (DSM_MAX_STATES, default 2000) is lifted here. The
tests build their large machines with the same functions.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsm import compile_text


def chain(n: int) -> str:
    """A line of n states."""
    lines = ["machine: chain", "start: s0", "states:"]
    for i in range(n - 1):
        lines += [f"  s{i}:", f"    next: s{i + 1}"]
    return "\n".join(lines + [f"  s{n - 1}:", "    terminal: true", ""])


def wide_fork(branches: int) -> str:
    """One fork of `branches` one-state branches."""
    lines = ["machine: wide", "start: f", "states:", "  f:",
             "    fork: [" + ", ".join(f"b{i}" for i in range(branches)) + "]", "    join: j"]
    for i in range(branches):
        lines += [f"  b{i}:", "    next: j"]
    return "\n".join(lines + ["  j:", "    next: done", "  done:", "    terminal: true", ""])


def nested_forks(depth: int) -> str:
    """f0 forks into f1 and c0 (joined at j0), f1 into f2 and c1 ... down to a leaf."""
    lines = ["machine: nested", "start: f0", "states:"]
    for d in range(depth):
        inner = f"f{d + 1}" if d + 1 < depth else "leaf"
        lines += [f"  f{d}:", f"    fork: [{inner}, c{d}]", f"    join: j{d}", f"  c{d}:", f"    next: j{d}",
                  f"  j{d}:", f"    next: {f'j{d - 1}' if d else 'done'}"]
    return "\n".join(lines + ["  leaf:", f"    next: j{depth - 1}", "  done:", "    terminal: true", ""])


def measure(shape: Callable[[int], str], n: int) -> tuple[int, float]:
    text = shape(n)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        graph = compile_text(text, f"{shape.__name__}.yaml", import_handlers=False)
        best = min(best, time.perf_counter() - started)
    return len(graph.states), best


def main(argv: list[str]) -> None:
    os.environ["DSM_MAX_STATES"] = "1000000"
    sizes = [int(a) for a in argv] or [1000, 2000, 5000, 9000]
    plan = [(chain, n) for n in sizes]
    if not argv:
        plan += [(wide_fork, n) for n in (1000, 4000)] + [(nested_forks, n) for n in (100, 200)]
    print(f"{'shape':<14}{'states':>8}{'seconds':>10}{'us/state':>10}")
    for shape, n in plan:
        states, seconds = measure(shape, n)
        print(f"{shape.__name__:<14}{states:>8}{seconds:>10.3f}{seconds / states * 1e6:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
