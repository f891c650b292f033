"""The price of isolation: trivial ticks/s through ThreadExecutor and ProcessExecutor, same machine.

    python bench/isolation.py                        # 20,000 ticks, 8 slots, 64 in flight, best of 3
    python bench/isolation.py -n 5000 --timeout 0    # smaller, and without a per-tick timeout

The handler returns None on a small payload, so what is measured is the executor: handing a call
over, normalizing the result, and (for processes) the round trip through the pipes. Each executor
is warmed up first (threads and child processes started), and runs alternate so that a machine
busy with other work weighs on both alike. The ratio is process / thread.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # dsm from this checkout; bench.bench_handlers for the children too

HANDLER = "bench.bench_handlers:noop"


def tick(handler: Any, serial: int, timeout: float | None) -> Any:
    from dsm.ticks import TickCall

    return TickCall(handler=handler, payload={"order": serial, "items": [1, 2, 3], "note": "bench"},
                    instance_id=f"i{serial}", machine="bench", state="work", attempt=1, branch=(), visit=1,
                    timeout=timeout, deadline=None, payload_limit=1 << 20)


async def measure(executor: Any, ticks: int, in_flight: int, timeout: float | None) -> float:
    """Ticks per second, `in_flight` lanes each awaiting its ticks one after the other."""
    from dsm import handlers

    handler = handlers.resolve(HANDLER)

    async def lane(count: int) -> None:
        for serial in range(count):
            outcome = await executor.start(tick(handler, serial, timeout)).outcome()
            if outcome.failure is not None:
                raise RuntimeError(f"a tick failed: {outcome.failure}")

    await asyncio.gather(*(lane(8) for _ in range(in_flight)))  # warm-up
    shares = [ticks // in_flight + (1 if k < ticks % in_flight else 0) for k in range(in_flight)]
    started = time.perf_counter()
    await asyncio.gather(*(lane(share) for share in shares))
    return ticks / (time.perf_counter() - started)


async def run_one(kind: str, args: argparse.Namespace) -> float:
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

    best = {"thread": 0.0, "process": 0.0}
    for round_ in range(args.repeat):
        for kind in ("thread", "process"):
            rate = asyncio.run(run_one(kind, args))
            best[kind] = max(best[kind], rate)
            print(f"run {round_ + 1}: {kind:7s} {rate:10,.0f} ticks/s", flush=True)
    print(f"{args.ticks:,} ticks, size {args.size}, {args.in_flight} in flight, "
          f"timeout {args.timeout or None}, best of {args.repeat}:")
    print(f"  thread  {best['thread']:10,.0f} ticks/s")
    print(f"  process {best['process']:10,.0f} ticks/s")
    print(f"  ratio process/thread {best['process'] / best['thread']:.2f}")


if __name__ == "__main__":
    main()
