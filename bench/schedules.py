"""Schedules at scale: 1,000 schedules due every minute, fired by one housekeeping leader.

    python bench/schedules.py                        # 1,000 schedules, 2 minutes
    python bench/schedules.py --schedules 200 --minutes 1

etcd is started by `dsm.testing.make_cluster` on free loopback ports. One `dsm worker` process
runs, serving a machine the schedules do not start (so it only fires them: the runs it starts wait
for workers that never come, and its CPU is the leader's firing alone). The schedules are created
(cron `* * * * *`), then the bench waits for the next whole minute and measures `--minutes`
minutes: every run's lateness (its instance's creation against the due time its id names), that
each due time started exactly one run of each schedule (none missing, none twice), and the
leader's CPU over the window, from /proc. A run prints its figures as JSON (also in
bench/results/schedules.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
import sys  # noqa: E402

sys.path.insert(0, str(ROOT))

from bench.run import connect, own_cpu, start_workers, stop_workers  # noqa: E402
from dsm import compiler  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.schedules import Schedules, Spec  # noqa: E402
from dsm.testing import make_cluster  # noqa: E402

FIRED = ROOT / "bench" / "linear.yaml"  # what the schedules start
SERVED = ROOT / "bench" / "loop.yaml"  # what the worker serves (not the schedules' machine)


def due_of(iid: str) -> float:
    stamp = iid.rsplit("-", 1)[1]
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()


async def measure(schedules: int, minutes: int) -> dict[str, Any]:
    env = make_cluster(1).start()
    namespace = "sched"
    procs = []
    try:
        store = await connect(env, namespace)
        keys = Keys(namespace)
        ops = Operations(store, keys)
        fired = compiler.load(FIRED, import_handlers=False)
        await ops.register(fired)
        made = Schedules(ops)
        for i in range(schedules):
            await made.create(Spec.of(f"s{i:04d}", {"machine": fired.machine, "cron": "* * * * *"}))
        procs = start_workers(env, 1, SERVED, namespace, concurrency=8)
        start = math.ceil(time.time() / 60) * 60 + 0.5  # from just after the next whole minute
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu0, wall0 = own_cpu(procs[0].pid), time.monotonic()
        await asyncio.sleep(minutes * 60)
        cpu1, wall1 = own_cpu(procs[0].pid), time.monotonic()
        await asyncio.sleep(5)  # the last minute's fires land
        runs = [inst async for inst in _all(ops)]
    finally:
        stop_workers(procs)
        env.stop()
    first = start - 0.5
    window = [r for r in runs if first <= due_of(r.id) < first + minutes * 60]
    late = sorted(r.created_at - due_of(r.id) for r in window)
    per_due: dict[float, list[str]] = {}
    for r in window:
        per_due.setdefault(due_of(r.id), []).append(r.id.rsplit("-", 1)[0])
    complete = all(sorted(names) == sorted(set(names)) and len(names) == schedules for names in per_due.values())
    fires = len(window)
    return {"schedules": schedules, "minutes": minutes, "due_times": len(per_due), "fires": fires,
            "every_due_time_once_per_schedule": complete and len(per_due) == minutes,
            "lateness_ms": {"p50": round(1000 * statistics.median(late), 1),
                            "p99": round(1000 * late[min(len(late) - 1, int(len(late) * 0.99))], 1),
                            "max": round(1000 * late[-1], 1)} if late else None,
            "leader_cpu_percent": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 2),
            "leader_cpu_us_per_fire": round(1e6 * (cpu1 - cpu0) / max(fires, 1), 1)}


async def _all(ops: Operations) -> Any:
    cursor = None
    while True:
        page = await ops.page(after=cursor, limit=1000)
        for inst in page.items:
            yield inst
        cursor = page.next
        if cursor is None:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=2)
    args = parser.parse_args()
    result = asyncio.run(measure(args.schedules, args.minutes))
    text = json.dumps(result, indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "schedules.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
