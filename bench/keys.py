"""Where a transition's etcd keys go: every key written or deleted over instances' whole lives, by
kind of key.

    python bench/keys.py                  # linear.yaml and forkjoin.yaml, 200 instances each
    python bench/keys.py --instances 1000

etcd counts what it writes (`etcd_mvcc_put_total` + `etcd_mvcc_delete_total`: a key put or
deleted is one, however many share a transaction); `bench/run.py` reads those counters around a
throughput run. This bench says which keys they are: one worker over the memory store (which
writes exactly the transactions a worker writes to etcd) runs the instances to their end while
a watch on the whole namespace sees every put and delete, each sorted by the kind of key
(`dsm.keys`: the record, history, work markers (claims live in them), the listing, expiry and
search entries ...). searched.yaml is linear.yaml with two search attributes set at submission
and changed by no transition: what it writes beyond linear.yaml is what search costs (its
entries, put when an instance is created; none by its transitions).
The definitions registered and the worker's own entry are left out: they are not the
instances'. Nothing here depends on the machine's speed or load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from dsm import compiler  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.service import serving  # noqa: E402
from dsm.store import prefix_end  # noqa: E402
from dsm.store.memory import MemoryStore  # noqa: E402

# transitions per instance; searched.yaml is linear.yaml with two search attributes no transition changes
MACHINES = {BENCH / "linear.yaml": 4, BENCH / "searched.yaml": 4, BENCH / "forkjoin.yaml": 6}
NOT_THE_INSTANCES = ("def", "machines", "workers", "housekeeper", "meta")


def kind(keys: Keys, key: str) -> str:
    """The kind of a namespace key, as `dsm.keys` lays them out."""
    parts = key[len(keys.root):].split("/")
    head = parts[0]
    if head == "work":  # a claim is in its marker's value; earlier releases' markers are work/<id>/<token>[/claim]
        ref = keys.parse_work(key)
        if ref is None:
            return "work (legacy)"
        return "sync marker" if ref.token == "sync" else "work marker"
    if head == "idx":  # idx/sm/ holds the listing entries; idx/all/, status/, machine/ only an earlier release's
        if parts[1] == "attr":
            return "search entry"
        return "listing" if parts[1] == "sm" else f"listing ({parts[1]}, legacy)"
    return {"inst": "record", "hist": "history", "exp": "expiry"}.get(head, head)


async def measure(definition: Path, instances: int) -> tuple[Counter[str], int]:
    """(keys put or deleted by kind, transitions) for `instances` of `definition` run to their end."""
    store, keys = MemoryStore(), Keys()
    graph = compiler.load(definition)
    client = Operations(store, keys)
    seen: Counter[str] = Counter()
    async with serving(store, keys, [graph], concurrency=16):
        start = await store.revision() + 1
        watch = await store.watch(keys.root, prefix_end(keys.root), start_revision=start)
        ids = await client.submit_many(graph, ({"customer": f"c{i % 100}", "order": i} for i in range(instances)))
        for iid in ids:
            await client.wait(iid, timeout=120)
        end = await store.revision()
        async for batch in watch:
            for event in batch.events:
                if event.kv.mod_revision > end:
                    continue
                name = kind(keys, event.kv.key)
                if name not in NOT_THE_INSTANCES:
                    seen[name] += 1
            if batch.events and batch.events[-1].kv.mod_revision >= end:
                break
        await watch.cancel()
    return seen, instances * MACHINES[definition]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    args = parser.parse_args()
    for definition in MACHINES:
        seen, transitions = await measure(definition, args.instances)
        total = sum(seen.values())
        print(f"{definition.name}: {args.instances} instances, {transitions} transitions, "
              f"{total} keys put or deleted = {total / transitions:.2f} per transition")
        for name, count in seen.most_common():
            print(f"  {name:<20} {count / transitions:6.2f} per transition  {count / args.instances:6.2f} per instance")


if __name__ == "__main__":
    asyncio.run(main())
