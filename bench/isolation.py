"""The price of isolation: trivial ticks/s through ThreadExecutor and ProcessExecutor, same machine.

    python bench/isolation.py                        # 20,000 ticks, 8 slots, 64 in flight, best of 3
    python bench/isolation.py -n 5000 --timeout 0    # smaller, and without a per-tick timeout

The handler returns None on a small payload, so what is measured is the executor: handing a call
over, normalizing the result, and (for processes) the round trip through the pipes. Each executor
is warmed up first (threads and child processes started), and runs alternate so that a machine
busy with other work weighs on both alike. The ratio is process / thread. With each run, the CPU
a tick cost this process (the event loop, and the threads of a ThreadExecutor) and its handler
processes (from /proc), which a busy machine blurs less than rates; the best run's is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # dsm from this checkout; bench.bench_handlers for the children too

from bench.run import children_cpu  # noqa: E402

HANDLER = "bench.bench_handlers:noop"


def tick(handler: Any, serial: int, timeout: float | None) -> Any:
    from dsm.ticks import TickCall

    return TickCall(handler=handler, payload={"order": serial, "items": [1, 2, 3], "note": "bench"},
                    instance_id=f"i{serial}", machine="bench", state="work", attempt=1, branch=(), visit=1,
                    timeout=timeout, deadline=None, payload_limit=1 << 20)


async def measure(executor: Any, ticks: int, in_flight: int, timeout: float | None) -> tuple[float, float, float]:
    """Ticks per second, `in_flight` lanes each awaiting its ticks one after the other; and the
    CPU seconds per tick of this process and of its children (the handler processes)."""
    from dsm import handlers

    handler = handlers.resolve(HANDLER)

    async def lane(count: int) -> None:
        for serial in range(count):
            outcome = await executor.start(tick(handler, serial, timeout)).outcome()
            if outcome.failure is not None:
                raise RuntimeError(f"a tick failed: {outcome.failure}")

    await asyncio.gather(*(lane(32) for _ in range(in_flight)))  # warm-up: processes started, handlers timed
    shares = [ticks // in_flight + (1 if k < ticks % in_flight else 0) for k in range(in_flight)]
    started, cpu, kids = time.perf_counter(), time.process_time(), children_cpu(os.getpid())
    await asyncio.gather(*(lane(share) for share in shares))
    took = time.perf_counter() - started
    return ticks / took, (time.process_time() - cpu) / ticks, (children_cpu(os.getpid()) - kids) / ticks


async def run_one(kind: str, args: argparse.Namespace) -> tuple[float, float, float]:
    from dsm.executors import ThreadExecutor
    from dsm.worker.isolation import ProcessExecutor

    executor: Any = ThreadExecutor(args.size) if kind == "thread" else ProcessExecutor(args.size)
    try:
        return await measure(executor, args.ticks, args.in_flight, args.timeout or None)
    finally:
        executor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--ticks", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=8, help="slots: threads or child processes")
    parser.add_argument("--in-flight", type=int, default=64, help="ticks started and not yet ended")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-tick timeout in seconds (0: none)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    args = parser.parse_args()

    best = {"thread": (0.0, 0.0, 0.0), "process": (0.0, 0.0, 0.0)}
    for round_ in range(args.repeat):
        for kind in ("thread", "process"):
            run = asyncio.run(run_one(kind, args))
            best[kind] = max(best[kind], run)
            print(f"run {round_ + 1}: {kind:7s} {run[0]:10,.0f} ticks/s; CPU µs per tick: this process "
                  f"{run[1] * 1e6:.1f}, handler processes {run[2] * 1e6:.1f}", flush=True)
    print(f"{args.ticks:,} ticks, size {args.size}, {args.in_flight} in flight, "
          f"timeout {args.timeout or None}, best of {args.repeat}:")
    for kind in ("thread", "process"):
        rate, cpu, kids = best[kind]
        print(f"  {kind:7s} {rate:10,.0f} ticks/s, CPU µs per tick {cpu * 1e6:.1f} + {kids * 1e6:.1f}")
    print(f"  ratio process/thread {best['process'][0] / best['thread'][0]:.2f}")


if __name__ == "__main__":
    main()
