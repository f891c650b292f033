"""Where a worker's CPU goes per transition: one worker in this process over a real etcd.

    python bench/profile_worker.py                      # 2,000 linear instances, handlers in processes
    python bench/profile_worker.py -n 4000 --isolation thread
    python bench/profile_worker.py --profile 25         # and cProfile's top 25 (by own time, per transition)
    python bench/profile_worker.py --rounds 3           # three measured rounds on the same worker
    python bench/profile_worker.py --concurrency 8      # with 8 slots
    python bench/profile_worker.py --run-ahead 1        # a commit per tick

A worker (`dsm.service.serving`, concurrency 64, `bench/linear.yaml`: 4 no-op ticks per instance)
runs in this process (its garbage collector paced as `dsm worker` paces it) against an etcd
started for the run; it first runs 128 instances (its handler processes started), then each
round submits `-n` instances from a separate process, so that the CPU this process spends
(`time.process_time`: its event loop and gRPC's threads) is the worker's own. Reported per
transition: the worker's CPU, less what it spends idle (heartbeats, measured for a second after
each round), its handler processes' and etcd's (from `/proc`); the commits and claims each request
to etcd carried; and the context switches of each per transition (every thread's, from `/proc`:
a process woken for a few calls pays for the wake-up). CPU time is what this code
controls and holds better than rates on a busy machine; with
`--profile`, cProfile's figures are the wall time of the worker's event loop thread (its wait in
`epoll` is idle time), about twice what the code costs unprofiled (compare rankings, not sums,
with the unprofiled figure); `--cumulative` ranks by time under each function.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import own_cpu  # noqa: E402

from dsm import compiler  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.service import serving  # noqa: E402
from dsm.store.etcd import EtcdOptions, EtcdStore  # noqa: E402
from dsm.testing import make_cluster  # noqa: E402
from dsm.worker.collector import pace_collector  # noqa: E402
from dsm.worker.defaults import DEFAULT_CONCURRENCY, DEFAULT_RUN_AHEAD  # noqa: E402

LINEAR = ROOT / "bench" / "linear.yaml"
PER_INSTANCE = 4
CONCURRENCY = DEFAULT_CONCURRENCY
WARM_UP = 2 * CONCURRENCY


def switches(pid: int) -> int:
    """Context switches of every thread of a process so far (voluntary and not); 0 once it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines() if "ctxt_switches:" in line)
    return total


def kids_of(exclude: set[int]) -> list[int]:
    """This process's children alive now but `exclude` (etcd): the handler processes."""
    pid = os.getpid()
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if int(k) not in exclude]
    except OSError:
        return []


def children_cpu(exclude: set[int]) -> float:
    """CPU seconds of the handler processes (`kids_of`)."""
    return sum(own_cpu(k) for k in kids_of(exclude))


async def submit(endpoint: str, namespace: str, count: int) -> None:
    """The submitting process: `count` linear instances."""
    store = await EtcdStore.connect(EtcdOptions.build(endpoint, namespace=namespace))
    try:
        await Operations(store, Keys(namespace)).submit_many(compiler.load(LINEAR), ({} for _ in range(count)))
    finally:
        await store.close()


async def measure(endpoint: str, etcd_pid: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    namespace = "profile"
    store = await EtcdStore.connect(EtcdOptions.build(endpoint, namespace=namespace))
    keys = Keys(namespace)
    graph = compiler.load(LINEAR)
    finished = 0
    target = 0
    done = asyncio.Event()

    def on_commit(step: Any) -> None:
        nonlocal finished
        if step.instance.finished:
            finished += 1
            if finished >= target:
                done.set()

    async def run_round(count: int) -> None:
        nonlocal target
        target = finished + count
        done.clear()
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--submit", endpoint, namespace,
                                                    str(count))
        await done.wait()
        await proc.wait()

    rounds = []
    profiler = cProfile.Profile() if args.profile else None
    pace_collector()  # as `dsm worker` does
    async with serving(store, keys, [graph], concurrency=args.concurrency, isolation=args.isolation,
                       on_commit=on_commit, worker_id="profile", run_ahead=args.run_ahead) as service:
        await run_round(WARM_UP)
        await asyncio.sleep(1.0)
        for _ in range(args.rounds):
            transitions, commits = service.worker.stats.transitions, service.worker.stats.committed
            batchers = (service.worker.runner.committer._batcher, service.worker.claimer._batcher)
            sent = [(b.batches, b.sent) for b in batchers]
            cpu, kids, etcd = time.process_time(), children_cpu({etcd_pid}), own_cpu(etcd_pid)
            before = [switches(os.getpid()), sum(switches(k) for k in kids_of({etcd_pid})), switches(etcd_pid)]
            if profiler is not None:
                profiler.enable()
            started = time.monotonic()
            await run_round(args.n)
            took = time.monotonic() - started
            if profiler is not None:
                profiler.disable()
            cpu, kids, etcd = time.process_time() - cpu, children_cpu({etcd_pid}) - kids, own_cpu(etcd_pid) - etcd
            after = [switches(os.getpid()), sum(switches(k) for k in kids_of({etcd_pid})), switches(etcd_pid)]
            count = service.worker.stats.transitions - transitions
            commits = service.worker.stats.committed - commits
            sent = [((b.sent - s) / max(1, b.batches - n), (b.batches - n) / count)
                    for b, (n, s) in zip(batchers, sent, strict=True)]
            idle = time.process_time()
            await asyncio.sleep(1.0)
            idle = time.process_time() - idle  # per second, with nothing to do
            rounds.append({"transitions": count, "rate": count / took, "idle_us_per_s": idle * 1e6,
                           "worker_us": (cpu - idle * took) / count * 1e6, "handlers_us": kids / count * 1e6,
                           "etcd_us": etcd / count * 1e6, "batches": sent, "per_commit": count / max(1, commits),
                           "switches": [(a - b) / count for a, b in zip(after, before, strict=True)]})
    await store.close()
    if profiler is not None:
        stats = pstats.Stats(profiler)
        total = sum(r["transitions"] for r in rounds)
        by = "cumulative" if args.cumulative else "own"
        print(f"\ncProfile, the worker's loop thread, µs per transition ({total} transitions), by {by} time:")
        column = 3 if args.cumulative else 2
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][column], reverse=True)  # type: ignore[attr-defined]
        for (file, line, func), (_, calls, tottime, cumtime, _) in rows[:args.profile]:
            where = f"{Path(file).name}:{line}({func})" if line else func
            print(f"  {tottime / total * 1e6:7.2f} own {cumtime / total * 1e6:8.2f} cum "
                  f"{calls / total:6.2f} calls  {where}")
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="instances per measured round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--isolation", choices=("process", "thread"), default="process")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="the worker's slots (`dsm worker`'s "
                        "default)")
    parser.add_argument("--run-ahead", type=int, default=DEFAULT_RUN_AHEAD, metavar="N",
                        help="ticks along a line in one commit (`dsm worker --run-ahead`; 1: a commit each)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP", help="cProfile's top TOP functions")
    parser.add_argument("--cumulative", action="store_true", help="rank by cumulative time, not own time")
    parser.add_argument("--submit", nargs=3, metavar=("ENDPOINT", "NAMESPACE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.submit:
        endpoint, namespace, count = args.submit
        asyncio.run(submit(endpoint, namespace, int(count)))
        return
    cluster = make_cluster(1).start()
    try:
        member = cluster.members[0]
        assert member.process is not None
        rounds = asyncio.run(measure(cluster.endpoint, member.process.pid, args))
    finally:
        cluster.stop()
    for r in rounds:
        print(f"{r['transitions']} transitions, {r['rate']:,.0f}/s; CPU µs per transition: worker "
              f"{r['worker_us']:.1f} (idle {r['idle_us_per_s']:.0f} µs/s taken off), handler processes "
              f"{r['handlers_us']:.1f}, etcd {r['etcd_us']:.1f}; {r['per_commit']:.2f} transitions per commit, "
              f"commits {r['batches'][0][0]:.1f} per request "
              f"({r['batches'][0][1]:.2f} requests per transition), claims {r['batches'][1][0]:.1f} per request; "
              f"context switches per transition: worker {r['switches'][0]:.2f}, handler processes "
              f"{r['switches'][1]:.2f}, etcd {r['switches'][2]:.2f}")


if __name__ == "__main__":
    main()
