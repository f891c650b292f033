"""Listing from the index: `dsm list --limit 20` with 100 and with 100,000 instances stored.

    python bench/listing.py                  # 100 vs 100,000 instances, on a fresh etcd
    python bench/listing.py --large 20000    # a smaller large side

Instances are stored (submitted, a mix of running and finished, of two machines, none run), then
the first page of 20 and a page deep inside are read, with and without filters, through the
client (the time of the read itself) and through the command (`dsm list --limit 20 --json`, a new
process each time, as a user runs it). Each figure is the median of 15 reads; the ratio compares
the large store to the small one. Every instance has a search attribute, `customer`, one of a
thousand: the `where` reads list one customer's instances (100 of 100,000; 1 of the 100).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsm import compiler  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.store.etcd import EtcdOptions, EtcdStore  # noqa: E402
from dsm.testing import make_cluster  # noqa: E402

SEARCH = "search:\n  customer: payload.customer\n"  # a thousand customers, each with 1 in 1,000 instances
WAITS = ("machine: {name}\nstart: a\n" + SEARCH.replace("{", "{{") +
         "states:\n  a: {{tick: nowhere:tick, next: done}}\n  done: {{terminal: true}}\n")
ENDS = "machine: ends\nstart: done\n" + SEARCH + "states:\n  done: {terminal: true}\n"
REPEAT = 15
FILTERS: dict[str, dict[str, Any]] = {"none": {}, "status": {"status": "succeeded"}, "machine": {"machine": "waits"},
                                      "both": {"status": "running", "machine": "other"},
                                      "where": {"where": {"customer": "c7"}},
                                      "where+status": {"where": {"customer": "c7"}, "status": "running"}}


def dsm_command() -> list[str]:
    script = Path(sys.executable).parent / "dsm"
    return [str(script)] if script.exists() else [sys.executable, str(ROOT / "cli.py")]


async def store_instances(client: Operations, count: int) -> None:
    graphs = [compiler.compile_text(WAITS.format(name=name), f"{name}.yaml", import_handlers=False)
              for name in ("waits", "other")]
    graphs.append(compiler.compile_text(ENDS, "ends.yaml", import_handlers=False))
    per = count // len(graphs)
    for graph in graphs:
        for start in range(0, per, 5000):
            await client.submit_many(graph, [{"n": i, "customer": f"c{i % 1000}"}
                                             for i in range(start, min(per, start + 5000))])


async def client_reads(client: Operations) -> dict[str, float]:
    out = {}
    for name, filters in FILTERS.items():
        times = []
        for _ in range(REPEAT):
            started = time.perf_counter()
            first = await client.page(limit=20, **filters)
            times.append(time.perf_counter() - started)
        out[name + ", first page"] = statistics.median(times) * 1000
        times = []
        for _ in range(REPEAT):
            started = time.perf_counter()
            await client.page(limit=20, after=first.next, **filters)
            times.append(time.perf_counter() - started)
        out[name + ", next page"] = statistics.median(times) * 1000
    return out


def command_reads(endpoint: str, namespace: str) -> float:
    times = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        done = subprocess.run([*dsm_command(), "list", "--limit", "20", "--json", "--etcd", endpoint, "--namespace",
                               namespace], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - started)
        assert len(json.loads(done.stdout)) == 20
    return statistics.median(times) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    env = make_cluster(1).start()
    results: dict[str, Any] = {}
    try:
        clients = {}
        for size in (args.small, args.large):  # both stored first, then read alike
            namespace = f"list{size}"
            store = await EtcdStore.connect(EtcdOptions.build(env.endpoint, namespace=namespace))
            clients[size] = (namespace, store, Operations(store, Keys(namespace)))
            started = time.monotonic()
            await store_instances(clients[size][2], size)
            print(f"stored {size:,} instances in {time.monotonic() - started:.1f}s", file=sys.stderr)
        await asyncio.sleep(5)  # let etcd settle after the writes
        for size, (namespace, store, client) in clients.items():
            results[size] = {"page_ms": await client_reads(client), "command_ms": command_reads(env.endpoint,
                                                                                                namespace)}
            await store.close()
    finally:
        env.stop()
    small, large = results[args.small], results[args.large]
    print(f"{'read':<48} {args.small:>10,} {args.large:>10,}  ratio")
    for name in small["page_ms"]:
        a, b = small["page_ms"][name], large["page_ms"][name]
        print(f"{'page of 20, filter ' + name + ' (ms)':<48} {a:>10.2f} {b:>10.2f}  {b / a:.2f}")
    a, b = small["command_ms"], large["command_ms"]
    print(f"{'dsm list --limit 20 --json (ms)':<48} {a:>10.0f} {b:>10.0f}  {b / a:.2f}")
    for name in ("first page", "next page"):
        where, none = large["page_ms"][f"where, {name}"], large["page_ms"][f"none, {name}"]
        print(f"{args.large:,} stored, {name}: where customer=c7 {where:.2f} ms, unfiltered {none:.2f} ms, "
              f"ratio {where / none:.2f}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
